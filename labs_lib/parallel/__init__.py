"""Hand-written parallelism, one scheme per file, applied to the single-device GPT from outside.

data_parallel.py  DDP by hand (bucketed, overlapped all-reduce)
zero.py           ZeRO-1/2 sharded optimizer, ZeRO-3 fully sharded module
comms.py          collectives as autograd Functions (Megatron's f/g operators)
tensor_parallel.py  Megatron column/row parallel layers, vocab parallel embedding and loss, sequence parallel
pipeline.py       stage partitioning, GPipe and 1F1B schedules with per-rank timelines
pipeline_run.py   the pipeline as a torchrun job writing per-rank timelines (lab 05), run() from a notebook
mesh.py           DP x TP x PP process groups, and every check of a layout
parallel3d.py     the GPT on that mesh: TP, then pipeline stages, then DP (what labs_lib.train.gpt --tp/--pp runs)
"""
