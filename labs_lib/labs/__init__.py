"""labs: one module per notebook, what it runs and reads back; the engine code it drives lives in the layers below.

common.py   shared by every lab: the header cell, loss gaps between runs
checks.py   the exercises' immediate checks
plots.py    the figures the notebooks draw
lab00.py    00 welcome: the 2-node all-reduce job (labs_lib.core.dist through labs_lib.jobs.launch), its transport,
            the topology, the links' bandwidth, the job-script exercise run on the cluster
lab01.py    01 data-parallel GPT: the exercises' checks (its jobs are labs_lib.jobs.launch.train_gpt)
lab02.py    02 profiling (labs_lib.measure.trace on the trainer's --trace-steps traces), the run in TensorBoard
lab03.py    03 memory saving: ZeRO by hand and DeepSpeed held bytes vs labs_lib.estimates, recompute timing,
            the gradient-accumulation check
lab04.py    04 tensor parallelism: runs' logs, layouts and parameters held (labs_lib.parallel.tensor_parallel)
lab05.py    05 pipeline parallelism: timeline jobs (labs_lib.train.pipeline_job on labs_lib.parallel.pipeline)
lab06.py    06 DeepSpeed beyond NLP: the ViT job (labs_lib.train.deepspeed.vit) and its results
lab07.py    07 auto-tuning: GPT-3 on paper, this machine calibrated, the planner against real runs, plans under a
            memory cap, our autotuner and DeepSpeed's (labs_lib.planner)
lab08.py    08 mixture of experts: the routing exercises and their checks, tokens dropped against capacity
            (labs_lib.models.moe, labs_lib.parallel.experts)
lab09.py    09 inference and model reduction: the lab's GPT, the serving table, the exercise checks (cached
            attention, top-p, int8 per channel), the cache's saving, the HF baseline, every reduction measured
            (labs_lib.inference, labs_lib.estimates.serving)
lab10.py    10 Triton deployment: the lab's run, config.pbtxt readers, the server started for the notebook, the
            exercise checks (TensorRT-LLM's request names, a batch in the metrics, a dynamic-batching config loaded)
            and the batching benchmark's settings (labs_lib.deploy)
lab10_trtllm.py  10, sections 10-11, TensorRT-LLM's ideas and path: exercise checks (KV blocks, scheduler
            admission), paged in-flight vs static contiguous measured, the tensorrt_llm repository and, where
            TensorRT-LLM is installed, its engine built and served (labs_lib.inference.paged / inflight,
            labs_lib.deploy.trtllm)
lab11.py    11 prompt engineering: the base and its fine-tune (--init-from), the grids of prompting settings, the
            Triton and Hugging Face completers, plots, the exercise checks (scorer, a prompt over the bar, the best
            decoding) (labs_lib.data.tasks, labs_lib.inference.prompting)
lab12.py    12 final review: the learner's runs and measurements read back per lab, the survey saved as JSON and
            summed up (``python -m labs_lib.labs.lab12``)
run_all.py  every lab notebook executed headless in order under one profile (``make run-all``): executed copies
            and the timing table
"""
