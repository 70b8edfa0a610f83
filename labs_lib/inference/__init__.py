"""inference: using a trained checkpoint (lab 09), and what lab 10 serves.

cache.py      the KV cache (preallocated, or grown for an exported graph) and the cached forward of the GPT
paged.py      the paged KV cache (a pool of fixed-size blocks, a block table per sequence) and the packed forward
              without padding (prefill chunks and decode tokens of many sequences in one row)
inflight.py   in-flight (continuous) batching over the paged cache: guaranteed_no_evict / max_utilization admission,
              eviction and resume, max_num_tokens per step, per-request sampling, stop sequences, streaming callbacks
generate.py   batched, KV-cached generation: greedy, temperature, top-k, top-p, repetition penalty, beam search,
              stop strings; the CLI ``python -m labs_lib.generate``
export.py     a run to the Hugging Face GPT-2 format (with its tokenizer) or to ONNX with KV-cache inputs and
              outputs; the CLI ``python -m labs_lib.export``
quantize.py   weight-only int8 (per-channel scales) and int4 (group-wise) by hand, bf16 / fp16, torch's own int8
prune.py      magnitude and structured (heads, MLP channels) pruning, and the recovery fine-tune
distill.py    knowledge distillation of the GPT into a smaller student, and the same student from scratch
prompting.py  prompts built from templates, examples and instructions, and their held-out accuracy measured against
              any completer (local generation, lab 11's Triton one, a Hugging Face model) over seeds (lab 11)
"""
