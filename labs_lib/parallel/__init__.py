"""parallel: hand-written parallelism, one scheme per file, applied to the single-device GPT from outside.

Fixed order (torchtitan's): tensor parallel → pipeline stages → activation checkpointing → compile → DP / ZeRO.

comms.py                collectives as autograd Functions (Megatron's f/g operators)
data_parallel.py        DDP by hand (bucketed, overlapped all-reduce)
zero.py                 ZeRO-1/2 sharded optimizer, ZeRO-3 fully sharded module
zero_data_parallel.py   ZeRO stage 1, 2 or 3 behind one interface for the training loop
tensor_parallel.py      Megatron column/row parallel layers, vocab parallel embedding and loss, sequence parallel
rng.py                  per-rank dropout generators for tensor parallelism (Megatron's RNG tracker)
pipeline.py             stage partitioning, GPipe, 1F1B and interleaved 1F1B schedules with per-rank timelines
mesh.py                 DP x TP x PP process groups, and every check of a layout (check_layout)
parallel3d.py           the GPT on that mesh: TP, then pipeline stages, then DP (``labs_lib.train --tp/--pp``)
recompute.py            activation checkpointing, full or selective
experts.py              expert parallelism: an MoE layer's experts over ranks, all-to-all dispatch and combine
"""
