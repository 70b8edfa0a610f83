"""measure: what a run measures, so that every claim a lab makes about speed or memory is a measurement.

trace.py          torch.profiler traces, top operators, compute / communication / idle per step, collectives and
                  one collective's share of the step (all-to-all in lab 08)
flops.py          peak FLOP/s (data sheet or measured) and MFU
memory.py         activations kept for backward, model-state bytes a rank holds (ours and DeepSpeed's), gathered
throughput.py     steady-state throughput: the one warm-up rule, and in-process training throughput
flops_report.py   DeepSpeed's flops profiler report, parsed
compute.py        matmul FLOP/s and a GPT's step time on every rank at once (a job module: all cores busy)
bandwidth.py      all-reduce time, algbw and busbw against message size (nccl-tests' way): a job module
tensorboard.py    a run's metrics as TensorBoard event files (every trainer's loop writes them), the server (make
                  tensorboard: scalars and the profiler plugin's traces), the scalars read back
"""
