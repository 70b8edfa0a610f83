"""DeepSpeed trainers: the production side of the workshop's ZeRO by hand, on the GPT and on lab 06's ViT.

    setup.py    build DeepSpeed's CPU ops once (``make setup``), the environment every job sets first, ``start()``:
                join the process group and hand it to DeepSpeed
    config.py   the one DeepSpeed config loader: a path or a name in configs/deepspeed/, every ``"auto"`` filled
                from the run, the settings this workshop cannot run refused before any process starts
    gpt.py      ``python -m labs_lib.train.deepspeed.gpt``: the GPT on ZeRO 0/1/2/3 and ZeRO-Offload, the losses and
                schedule of ``python -m labs_lib.train``, each rank's held bytes in metrics.jsonl (lab 03)
    moe.py      DeepSpeed's MoE layer swapped into the GPT's MoE blocks (``--n-experts N --ep E``), its expert
                parameters split into optimizer groups of their own (lab 08)
    vit.py      ``python -m labs_lib.train.deepspeed.vit``: the ViT on the digits with ZeRO-2 + bf16, one record per
                epoch, the flops profiler's report (lab 06; read back with labs_lib.measure.flops_report)

Both job modules take ``--out`` and ``--no-progress``, have ``check_args(argv, world_size)``, and run their steps
through labs_lib.train.loop.run_loop; notebooks launch them with labs_lib.jobs.launch.
"""
