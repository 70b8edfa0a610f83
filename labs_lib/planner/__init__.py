"""Lab 07's planner: predict memory, time and fit for any GPT on any cluster, calibrate this machine, auto-tune.

    plan.py                 estimate(model, cluster, plan): per-GPU memory, FLOPs, communication, step time,
                            tokens/s, MFU, training days, fits (and why not); check_plan
    specs.py                ModelSpec, ClusterSpec, Plan, Estimate (re-exported by plan.py), parameters per rank
    presets.py              model presets (gpt2-small ... megatron-1t) and cluster presets (h100-80gb, a100-80gb,
                            h200, local: this machine as calibrate.py measured it)
    __main__.py             ``python -m labs_lib.planner --model gpt3-175b --gpus 1024 ...`` (table or --json)
    calibrate.py            measures this machine like nccl-tests and a GEMM benchmark: all-reduce bus bandwidth
                            against message size within a node and across two, matmul FLOP/s -> the local preset
    autotune.py             enumerate plans, drop what does not fit or is dominated, run the best as real trials
                            through labs_lib.jobs.launch, pick the winner
    accuracy.py             the planner held to measurement: predicted per-rank memory and step time beside real
                            runs of six layouts on the local cluster
    deepspeed_autotune.py   DeepSpeed's own autotuner, started the way its users start it (deepspeed launcher,
                            hostfile of the local cluster's nodes), its choice read back

The formulas the planner adds up live below it, in labs_lib.estimates (ZeRO states, Korthikanti activations, TP
communication, the pipeline bubble); the experiments lab 07 runs live in labs_lib.labs.lab07.
"""
