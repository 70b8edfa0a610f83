"""jobs: how the labs start multi-process work (never inside the notebook's kernel).

process.py   a child process with its log, progress and a clear error (the log's first error and tail)
slurm.py     submit, follow, cancel Slurm jobs; the local cluster of simulated nodes (``python -m labs_lib.jobs.slurm``)
launch.py    the one launcher: check → fresh run folder → Slurm or torchrun → progress → result
"""
