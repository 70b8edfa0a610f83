"""The tokenizer side of serving, without torch: what the preprocessing and postprocessing models run.

Text to ids and back follow ``labs_lib.data.text`` exactly (``encode`` is the tokenizer's ids, ``decode`` keeps
special tokens), but this module imports only ``tokenizers`` and numpy, so those two Triton models start without
loading torch. Word lists (stop words, bad words) use TensorRT-LLM's layout, a [2, L] int32 array: row 0 the
words' token ids one after another, row 1 the offset where each word ends, padded with -1 (an empty list is
[[0], [-1]]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

__all__ = ["TOKENIZER_FILE", "load_run_tokenizer", "encode_text", "decode_ids", "to_word_list", "from_word_list",
           "strings_of"]

TOKENIZER_FILE = "tokenizer.json"


def load_run_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    """The tokenizer of a run folder (or any folder holding tokenizer.json, an HF export included)."""
    path = Path(tokenizer_dir) / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: tokenizer_dir must be the run folder the model trained in "
                                "(it holds tokenizer.json); render the repository again from that run")
    return Tokenizer.from_file(str(path))


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text).ids  # labs_lib.data.text.encode's rule


def decode_ids(tokenizer: Tokenizer, ids, skip_special_tokens: bool = False) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def to_word_list(tokenizer: Tokenizer, words: list[str]) -> np.ndarray:
    """TensorRT-LLM's [2, L] word list of ``words`` (empty strings are no word)."""
    flat, offsets = [], []
    for word in words:
        if word:
            flat += encode_text(tokenizer, word)
            offsets.append(len(flat))
    width = max(1, len(flat))
    out = np.zeros((2, width), np.int32)
    out[1] = -1
    out[0, :len(flat)] = flat
    out[1, :len(offsets)] = offsets
    return out


def from_word_list(words: np.ndarray | None) -> list[tuple[int, ...]]:
    """The token sequences of a [2, L] word list (or a [1, 2, L] one with the batch dimension); None → []."""
    if words is None or words.size == 0:
        return []
    words = np.asarray(words)
    if words.ndim == 3:
        if words.shape[0] != 1:
            raise ValueError(f"a word list per request, got {words.shape[0]}: send one prompt per request")
        words = words[0]
    if words.ndim != 2 or words.shape[0] != 2:
        raise ValueError(f"a word list has shape [2, L] (ids, end offsets), not {list(words.shape)}")
    ids, ends = words[0].tolist(), [int(e) for e in words[1] if e >= 0]
    out, start = [], 0
    for end in ends:
        if not start < end <= len(ids):
            raise ValueError(f"word list offsets {ends} do not fit its {len(ids)} ids: they must increase within it")
        out.append(tuple(int(i) for i in ids[start:end]))
        start = end
    return out


def strings_of(array: np.ndarray | None, name: str = "a string input") -> list[str]:
    """A TYPE_STRING tensor's elements as text (bytes decoded as UTF-8), flattened; None → [].

    Bytes that are not UTF-8 are a ValueError naming ``name`` (replacing them would generate from another text)."""
    if array is None:
        return []
    out = []
    for v in np.asarray(array, dtype=object).reshape(-1):
        try:
            out.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start} of {v[:16]!r}): send the "
                             "text encoded as UTF-8") from None
    return out
