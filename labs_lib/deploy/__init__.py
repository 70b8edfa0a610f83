"""deploy: a trained run served by a real Triton Inference Server (lab 10).

server.py       find tritonserver (PATH, $TRITONSERVER, or the nvidia-pytriton wheel laid out once), start it on
                127.0.0.1 (free or given ports, explicit model control, log to a file), wait until ready, stop it;
                load / unload / the READY table from the repository index; tritonclient's perf_analyzer
repository.py   render triton_models/ (TensorRT-LLM's inflight_batcher_llm layout: preprocessing, gpt,
                postprocessing, ensemble) from a run's checkpoint (torch or ONNX engine)
engine.py       the gpt model's engine: TensorRT-LLM's tensors to KV-cached generation, batching, streaming; or the
                ONNX export run by ONNX Runtime
inflight.py     in-flight batching inside the gpt model (batching_strategy inflight_fused_batching): a scheduler
                thread over the paged-cache batcher, answering each request through its response sender
tensor_parallel.py  tensor-parallel serving: tp worker processes holding the shards, driven by the gpt model's
                instance in lockstep (gloo on CPU, NCCL on GPU)
words.py        the tokenizer side without torch (preprocessing / postprocessing), TensorRT-LLM's word lists
metrics.py      the server's Prometheus metrics as Python values (read_metrics, metric)
trtllm.py       TensorRT-LLM's real path for NVIDIA's container: the engine's build commands, the tensorrt_llm
                repository variant's field check, the launch command, what this machine can do
client.py       the generate / generate_stream endpoints, tritonclient HTTP and gRPC (streaming too)
mixed.py        a mixed workload streamed through the ensemble: TTFT, latency, tokens/s and KV bytes for no,
                dynamic and in-flight batching (the serving benchmark's second part)

The command line: ``python -m labs_lib.deploy serve --checkpoint RUN``, ``python -m labs_lib.deploy trtllm ...``
(see __main__.py).
"""
