"""models: single-device models that never learn about parallelism (it is applied from outside, labs_lib.parallel).

gpt.py   the workshop GPT (GPT-2 shape), parameter and FLOP counts
hf.py    the GPT to and from Hugging Face's GPT2LMHeadModel format
vit.py   the vision transformer of lab 06, its profiles and FLOP formula
moe.py   a mixture-of-experts MLP (top-k router, capacity and drops, load-balancing and z losses) for lab 08
"""
