"""labs_lib: the helper library behind the Model Parallelism workshop notebooks.

Layers, lowest first; each imports only from its own layer and the ones below (tests/test_layers.py checks it):

    core        settings and run profiles, paths, process groups, checkpoints, run folders, tables
    models      the single-device GPT (and its Hugging Face format), the ViT: untouched by parallelism
    data        the text corpus and tokenizer, the digits images
    parallel    hand-written parallelism applied from outside: DP, ZeRO, TP, PP, 3D, recompute
    measure     what a run measures: traces, FLOPs and MFU, memory held, steady-state throughput
    estimates   the analytic formulas the measurements are held to: memory, TP / PP, DeepSpeed's allocation
    train       the one training loop, the step strategies and the job modules (GPT, DeepSpeed GPT and ViT,
                pipeline timelines)
    inference   a trained checkpoint in use: KV-cached generation, export (HF, ONNX), quantization, pruning,
                distillation
    jobs        child processes, Slurm, and the one launcher every lab's job goes through
    labs        per notebook: what it runs and reads back (lab00 ... lab07), exercise checks, plots
    planner     lab 07: memory / time / fit of any GPT on any cluster, this machine calibrated, auto-tuning
    deploy      lab 10: a run served by a real Triton server (find / start / stop it, the TensorRT-LLM-style model
                repository rendered from a checkpoint, the gpt model's engine, clients)
    grading     the assessment (an nbgrader course in assessment/): its questions and checks, the practical part's
                DeepSpeed jobs graded from their outputs, the grader's workflow, certificates

Entry points beside the layers: ``python -m labs_lib.generate`` and ``python -m labs_lib.export`` (the inference
layer's command lines), ``python -m labs_lib.train``, ``python -m labs_lib.deploy serve --checkpoint RUN``,
``python -m labs_lib.grading`` (the assessment's commands).

Where a lab's experiment lives: labs_lib/labs/labNN.py (its docstring names the engine code it runs).
"""

__version__ = "0.1.0"
