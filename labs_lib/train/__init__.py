"""train: the one training loop, the step of each layout, and the job modules that run them.

loop.py           run_loop: learning rate, timing, metrics records, eval and checkpoint cadence, progress, profiler
steps.py          one optimizer step per layout: data parallel, ZeRO by hand, DP x TP x PP (strategies)
optim.py          AdamW with the one weight-decay rule, the learning-rate schedule
cli.py            the flag tables, parsers and pre-launch checks (check_args) of the trainers
resume.py         checkpoints of the GPT trainer: save (atomic, all ranks) and the resume checks
gpt.py            the GPT trainer: ``python -m labs_lib.train`` (__main__.py)
pipeline_job.py   lab 05's pipeline job: per-rank timelines of GPipe / 1F1B / interleaved, or torch's schedules
deepspeed         DeepSpeed trainers (GPT, ViT), their config handling and the op warm-up
"""
