"""Corpus, BPE tokenizer, token files on disk and rank-sharded batches.

    info = prepare_data()                          # the Python standard library's sources, vocab 512
    batches = TokenBatches(info.train_path, batch_size=8, seq_len=64, rank=0, world_size=1)
    x, y = next(batches)                           # LongTensor [8, 64] each, y is x shifted by one token

Nothing is downloaded: the default corpus is the standard library that ships with Python, and the tokenizer is
a byte-level BPE (GPT-2 style) trained here with the `tokenizers` library. ``prepare_data`` caches its result in
``cache_dir()/data/<key>`` (tokenizer.json, train.bin, val.bin, meta.json), keyed by the corpus files and the
settings, so every run and every rank after the first reuses it.

Batches: the token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens. Each epoch shuffles
the windows (seeded by seed and epoch); global batch ``i`` is windows ``[i*G, (i+1)*G)`` of that order with
``G = batch_size * world_size``, and rank ``r`` takes its ``batch_size`` slice. So 1 process with batch 8 sees
exactly what 2 ranks with batch 4 see together, and a position (``state_dict``) resumes the stream exactly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from labs_lib.core import paths

FORMAT_VERSION = 1  # bump when the files written by prepare_data change meaning
EOT = "<|endoftext|>"  # the one special token; it ends every document in the token stream
TEXT_SUFFIXES = (".py", ".pyi", ".txt", ".md", ".rst", ".text", ".tex", ".c", ".h", ".cpp", ".js", ".html",
                 ".css", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_CHUNK_CHARS = 1 << 20  # long documents are encoded in ~1 MB pieces: parallel, and the progress bar moves


# ---------------------------------------------------------------------------------------------------- corpus

def default_corpus_files() -> list[Path]:
    """The standard library's own ``.py`` files, without its test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune: site-packages can be huge
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def corpus_files(source: str | Path | None = None) -> list[Path]:
    """The files of a corpus: None → the standard library; a file → that file; a folder → its text files."""
    if source is None:
        return default_corpus_files()
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist: pass a text file, a folder of text files, or None "
                                "(the Python standard library)")
    if path.is_file():
        return [path]
    files = sorted((p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") or part == "__pycache__"
                                for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES[:4])}, ...) in folder {path}: pass a folder "
                         "that holds some, a single text file, or None (the Python standard library)")
    return files


def _files_within(files: list[Path], max_bytes: int | None) -> list[Path]:
    """The leading files that hold the first ``max_bytes`` bytes (all files when there is no cap)."""
    if max_bytes is None:
        return files
    used, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        used.append(f)
        total += f.stat().st_size
    return used


def read_corpus(files: list[Path], max_bytes: int | None = None) -> list[str]:
    """One string per file, in order, stopping after ``max_bytes`` bytes (the last file is cut there)."""
    docs, total = [], 0
    for f in _files_within(files, max_bytes):
        raw = f.read_bytes()
        if max_bytes is not None:
            raw = raw[: max_bytes - total]
        total += len(raw)
        if raw:
            docs.append(raw.decode("utf-8", errors="replace"))
    return docs


# ---------------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: 256 byte symbols + <|endoftext|> + merges, ``vocab_size`` tokens if the corpus allows."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text).ids


def decode(tokenizer: Tokenizer, ids) -> str:
    # Special tokens are kept so that decode(encode(s)) == s for any s, document separators included.
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _split(doc: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Cut a long document after a newline that precedes non-space, where the pre-tokenizer splits anyway."""
    pieces, start = [], 0
    while len(doc) - start > size:
        cut = start + size
        while cut < len(doc) and not (doc[cut - 1] == "\n" and not doc[cut].isspace()):
            cut += 1
        pieces.append(doc[start:cut])
        start = cut
    pieces.append(doc[start:])
    return pieces


def encode_documents(tokenizer: Tokenizer, docs: list[str], progress: bool = True) -> np.ndarray:
    """All documents as one int64 stream, each followed by <|endoftext|>."""
    eot = tokenizer.token_to_id(EOT)
    out = []
    total = sum(len(d) for d in docs)
    with tqdm(total=total, desc="encode", unit="char", unit_scale=True, delay=1.0, disable=not progress) as bar:
        batch, batch_chars = [], 0
        for i, doc in enumerate(docs):
            batch.append(doc)
            batch_chars += len(doc)
            if batch_chars < _CHUNK_CHARS and i < len(docs) - 1:
                continue
            # encode_batch runs on all cores; a long document is split so that it does too.
            pieces = [_split(d) for d in batch]
            encodings = iter(tokenizer.encode_batch([p for ps in pieces for p in ps], add_special_tokens=False))
            for ps in pieces:
                for _ in ps:
                    out.append(np.asarray(next(encodings).ids, dtype=np.int64))
                out.append(np.array([eot], dtype=np.int64))
            bar.update(batch_chars)
            batch, batch_chars = [], 0
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- cache

@dataclass
class DataInfo:
    dir: Path
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    vocab_size: int
    dtype: str  # numpy dtype name of train.bin / val.bin
    n_train_tokens: int
    n_val_tokens: int

    @classmethod
    def load(cls, dir: str | Path) -> DataInfo:
        dir = Path(dir)
        meta = json.loads((dir / "meta.json").read_text())
        return cls(dir=dir, tokenizer_path=dir / "tokenizer.json", train_path=dir / "train.bin",
                   val_path=dir / "val.bin", vocab_size=meta["vocab_size"], dtype=meta["dtype"],
                   n_train_tokens=meta["n_train_tokens"], n_val_tokens=meta["n_val_tokens"])


def _cache_key(files: list[Path], source, vocab_size: int, max_bytes: int | None, val_fraction: float,
               tokenizer: Path | None) -> str:
    import tokenizers

    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, tokenizers.__version__, vocab_size, max_bytes, val_fraction]).encode())
    if tokenizer is not None:
        h.update(b"tokenizer\0" + tokenizer.read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    name = "stdlib" if source is None else Path(source).name or "corpus"
    return f"{name}-v{vocab_size}-{h.hexdigest()[:16]}"


def prepare_data(source: str | Path | None = None, vocab_size: int = 512, max_bytes: int | None = None,
                 val_fraction: float = 0.05, cache_dir: str | Path | None = None, progress: bool = True,
                 tokenizer: str | Path | None = None) -> DataInfo:
    """Tokenize a corpus once and cache it; later calls (any process, any rank) reuse the cached files.

    ``tokenizer``: a tokenizer.json to encode with (a fine-tune keeps its base's tokenizer) instead of training a
    ``vocab_size`` one on the corpus.

    Several processes may call this at once (every rank of a job does): one prepares under a file lock while
    the others wait, and the result is renamed into place only when complete, so a crash never leaves half a
    cache behind.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the 256 byte symbols + 1 special token: "
                         "use at least 257")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be positive (or None for the whole corpus), got {max_bytes}")
    files = _files_within(corpus_files(source), max_bytes)
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    root = Path(cache_dir if cache_dir is not None else paths.cache_dir()) / "data"
    key = _cache_key(files, source, vocab_size, max_bytes, val_fraction, tokenizer)
    final = root / key
    if (final / "meta.json").exists():
        return DataInfo.load(final)

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (final / "meta.json").exists():  # another process prepared it while we waited
            return DataInfo.load(final)
        for stale in root.glob(f".tmp-{key}-*"):  # left by a crashed preparation; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{key}-{os.getpid()}"
        tmp.mkdir()
        try:
            _prepare_into(tmp, files, source, vocab_size, max_bytes, val_fraction, progress, tokenizer)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DataInfo.load(final)


def _prepare_into(out: Path, files: list[Path], source, vocab_size: int, max_bytes: int | None,
                  val_fraction: float, progress: bool, given_tokenizer: Path | None) -> None:
    t0 = time.perf_counter()
    docs = read_corpus(files, max_bytes)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    if n_bytes == 0:
        raise ValueError(f"the corpus {source or 'stdlib'} is empty: pass files that contain text")
    if progress:
        how = f"with {given_tokenizer}" if given_tokenizer else f"training a {vocab_size}-token BPE tokenizer"
        print(f"preparing data: {len(docs)} files, {n_bytes / 1e6:.1f} MB, {how} (cached in {out.parent})",
              flush=True)
    tokenizer = load_tokenizer(given_tokenizer) if given_tokenizer else train_tokenizer(docs, vocab_size)
    t_train = time.perf_counter() - t0
    tokens = encode_documents(tokenizer, docs, progress)
    n_vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if n_vocab < 2**16 else np.uint32
    n_val = int(round(len(tokens) * val_fraction))
    split = len(tokens) - n_val
    tokens[:split].astype(dtype).tofile(out / "train.bin")
    tokens[split:].astype(dtype).tofile(out / "val.bin")
    tokenizer.save(str(out / "tokenizer.json"))
    meta = {"format_version": FORMAT_VERSION, "vocab_size": n_vocab, "dtype": np.dtype(dtype).name,
            "n_train_tokens": int(split), "n_val_tokens": int(n_val), "requested_vocab_size": vocab_size,
            "source": str(source) if source is not None else "stdlib", "n_files": len(docs), "n_bytes": n_bytes,
            "max_bytes": max_bytes, "val_fraction": val_fraction, "eot_id": tokenizer.token_to_id(EOT),
            "bytes_per_token": round(n_bytes / max(len(tokens), 1), 3),
            "seconds_tokenizer": round(t_train, 2), "seconds_total": round(time.perf_counter() - t0, 2)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    if progress:
        print(f"data ready: {len(tokens):,} tokens ({meta['bytes_per_token']} bytes/token), vocab {n_vocab}, "
              f"{meta['seconds_total']} s", flush=True)


# ---------------------------------------------------------------------------------------------------- batches

def _open_tokens(tokens_path: str | Path, dtype) -> np.ndarray:
    tokens_path = Path(tokens_path)
    if not tokens_path.exists():
        raise FileNotFoundError(f"token file {tokens_path} does not exist: run prepare_data() first")
    if dtype is None:
        meta = tokens_path.parent / "meta.json"
        if not meta.exists():
            raise ValueError(f"no meta.json beside {tokens_path} to read the token dtype from: pass dtype=")
        dtype = json.loads(meta.read_text())["dtype"]
    if tokens_path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(tokens_path, dtype=dtype, mode="r")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return w[:, :-1], w[:, 1:]


class DataError(ValueError):
    """The data cannot feed the run as configured (too few tokens for one batch): the message names the fix."""


class TokenBatches:
    """Endless, deterministic, resumable (x, y) batches of one rank's share of every global batch."""

    def __init__(self, tokens_path: str | Path, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, dtype=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = _open_tokens(tokens_path, dtype)
        self.batch_size, self.seq_len, self.rank, self.world_size, self.seed = (
            batch_size, seq_len, rank, world_size, seed)
        self.global_batch = batch_size * world_size
        self.n_windows = len(self.tokens) // (seq_len + 1)
        self.batches_per_epoch = self.n_windows // self.global_batch
        if self.batches_per_epoch == 0:
            need = self.global_batch * (seq_len + 1)
            raise DataError(f"{tokens_path} holds {len(self.tokens):,} tokens but one global batch of "
                             f"{batch_size} x {world_size} ranks x {seq_len + 1} tokens needs {need:,}: lower "
                             "batch_size or seq_len (block_size), or use more data")
        self.batches_drawn = 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    @property
    def epoch(self) -> int:
        return self.batches_drawn // self.batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(self.batches_drawn, self.batches_per_epoch)
        first = i * self.global_batch + self.rank * self.batch_size
        windows = self._epoch_order(epoch)[first: first + self.batch_size]
        self.batches_drawn += 1
        return _windows(self.tokens, windows * (self.seq_len + 1), self.seq_len)

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn, "epoch": self.epoch, "seed": self.seed,
                "seq_len": self.seq_len, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        # The position only means the same thing for the same window size, shuffle and global batch.
        for name in ("seed", "seq_len", "global_batch"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"cannot resume the data stream: it was saved with {name}={state[name]}, this run "
                                 f"has {name}={getattr(self, name)}; use the same value to continue exactly")
        self.batches_drawn = int(state["batches_drawn"])


def eval_batches(tokens_path: str | Path, batch_size: int, seq_len: int, n_batches: int, rank: int = 0,
                 world_size: int = 1, dtype=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of validation batches (the same on every call), rank-sharded like TokenBatches.

    Windows come in one fixed shuffled order so that a few batches sample the whole validation split; a split
    smaller than ``n_batches`` global batches is cycled through.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    tokens = _open_tokens(tokens_path, dtype)
    n_windows = len(tokens) // (seq_len + 1)
    if n_windows == 0:
        raise ValueError(f"{tokens_path} holds {len(tokens):,} tokens, fewer than one sequence of {seq_len + 1}: "
                         "lower seq_len (block_size) or raise val_fraction / the corpus size")
    order = np.random.default_rng(0).permutation(n_windows)
    global_batch = batch_size * world_size
    batches = []
    for i in range(n_batches):
        positions = i * global_batch + rank * batch_size + np.arange(batch_size)
        batches.append(_windows(tokens, order[positions % n_windows] * (seq_len + 1), seq_len))
    return batches

