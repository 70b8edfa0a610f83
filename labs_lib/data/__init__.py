"""data: data sets that ship with Python or a package, so nothing is downloaded at run time.

text.py     the corpus (the standard library's sources, or any text), a BPE tokenizer, token shards, rank-sharded
            batches
digits.py   scikit-learn's 8x8 digits, split and standardised, and a rank-sharded loader (lab 06)
"""
