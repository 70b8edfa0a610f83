"""core: what every other layer stands on; imports nothing else of labs_lib.

config.py       GPTConfig / TrainConfig / ParallelConfig, the run profiles ci / cpu / gpu, validate (every bad
                combination a clear error naming the fix, before any process starts), padded_vocab, ZERO_STAGES
paths.py        where builds, caches and runs go (LABS_BUILD_DIR, LABS_CACHE_DIR, LABS_RUNS_DIR)
dist.py         process groups under torchrun, Slurm or one process; ``python -m labs_lib.core.dist`` all-reduce
checkpoint.py   safetensors checkpoints written atomically, pruned, loaded without unpickling code
runs.py         a run folder: metrics.jsonl read / append / truncate, atomic JSON, a fresh folder
memcap.py       a memory cap per rank that plays a GPU's memory (RLIMIT_DATA), its out-of-memory error
tables.py       rows of dicts as a plain-text table
"""
