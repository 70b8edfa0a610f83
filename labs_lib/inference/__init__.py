"""inference: using a trained checkpoint.

generate.py   load a run's newest checkpoint and sample text: ``python -m labs_lib.inference.generate``
"""
