"""estimates: the analytic formulas that the measurements are held to (published ones, and DeepSpeed's own).

memory.py      bytes per parameter, ZeRO stages, activations per layer (Korthikanti), the memory table of presets
activations.py activations per layer under TP / SP / recomputation (Megatron-style and labs_lib's GPT), and how
               many layers' worth a pipeline rank keeps in flight
parallel.py    tensor parallelism's parameters and traffic per rank, the pipeline bubble
deepspeed.py   what DeepSpeed 0.19.8 allocates per rank, derived from its code
serving.py     the memory of serving: weights and KV cache by batch, sequence length and tensor parallelism
"""
