"""data: data sets that ship with Python or a package, so nothing is downloaded at run time.

text.py     the corpus (the standard library's sources, or any text), a BPE tokenizer, token shards, rank-sharded
            batches
digits.py   scikit-learn's 8x8 digits, split and standardised, and a rank-sharded loader (lab 06)
tasks.py    lab 11's task suite: one-word questions about Python literals, answers computed by Python, held-out
            items, training episodes and the fine-tune's data folder
"""
