"""labs_lib.data.text: corpus, tokenizer, cache, and the rank-sharded, resumable batch stream."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from labs_lib.data.text import (
    DataInfo,
    TokenBatches,
    corpus_files,
    decode,
    default_corpus_files,
    encode,
    eval_batches,
    load_tokenizer,
    prepare_data,
)

SMALL = 200_000  # bytes of standard library: enough for a 512-token BPE, well under a second


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return prepare_data(None, 512, SMALL, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture
def stream(tmp_path):
    """A token file holding 0, 1, 2, ...: every window is recognisable by its first token."""
    path = tmp_path / "tokens.bin"
    np.arange(10_000, dtype=np.uint16).tofile(path)
    return path


def test_default_corpus_is_the_stdlib_without_tests():
    files = default_corpus_files()
    assert len(files) > 100 and sum(f.stat().st_size for f in files) > 1_000_000
    assert files == default_corpus_files()  # deterministic order
    assert {"os.py", "functools.py", "__init__.py"} <= {f.name for f in files}
    for f in files:
        assert f.suffix == ".py" and not f.name.startswith("test_")
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(f.parts[-4:-1])


def test_tokenizer_round_trips_python_and_has_the_vocab_size(small_data):
    tok = load_tokenizer(small_data.tokenizer_path)
    assert tok.get_vocab_size() == small_data.vocab_size == 512
    source = default_corpus_files()[-1].read_text()
    for text in [source, "def f(x):\n\treturn x ** 2  # ünïcode ✓ 🐍\r\n\n",
                 "a<|endoftext|>b", ""]:
        ids = encode(tok, text)
        assert decode(tok, ids) == text
        assert max(ids, default=0) < 512
    assert len(encode(tok, source)) < len(source.encode()) / 1.8  # merges were learnt: ~2 bytes per token


def test_token_files_match_meta(small_data):
    meta = json.loads((small_data.dir / "meta.json").read_text())
    assert small_data == DataInfo.load(small_data.dir)
    assert small_data.dtype == "uint16" and meta["n_bytes"] == SMALL
    train = np.fromfile(small_data.train_path, dtype=small_data.dtype)
    val = np.fromfile(small_data.val_path, dtype=small_data.dtype)
    assert len(train) == small_data.n_train_tokens and len(val) == small_data.n_val_tokens
    assert abs(len(val) / (len(train) + len(val)) - 0.05) < 0.001
    # documents end with <|endoftext|>; the whole stream decodes back to the corpus files it came from
    tok = load_tokenizer(small_data.tokenizer_path)
    eot = tok.token_to_id("<|endoftext|>")
    stream = np.concatenate([train, val]).tolist()
    assert stream[-1] == eot
    first_file = next(f for f in corpus_files() if f.stat().st_size)
    assert decode(tok, stream[: stream.index(eot)]) == first_file.read_bytes().decode("utf-8", errors="replace")


def test_second_prepare_reuses_the_cache(tmp_path):
    info = prepare_data(None, 300, 50_000, cache_dir=tmp_path, progress=False)
    mtime = info.tokenizer_path.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = prepare_data(None, 300, 50_000, cache_dir=tmp_path, progress=False)
    assert again == info and time.perf_counter() - t0 < 0.5
    assert info.tokenizer_path.stat().st_mtime_ns == mtime  # not retrained
    other = prepare_data(None, 300, 60_000, cache_dir=tmp_path, progress=False)
    assert other.dir != info.dir  # other settings, other cache entry
    assert not list((tmp_path / "data").glob(".tmp-*"))  # nothing half-written left behind


def test_concurrent_prepare_trains_once(tmp_path):
    script = textwrap.dedent(f"""
        from labs_lib.data.text import prepare_data
        info = prepare_data(None, 300, 40_000, cache_dir={str(tmp_path)!r}, progress=True)
        print("DIR", info.dir)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    dirs = {line for out in outs for line in out.splitlines() if line.startswith("DIR")}
    assert len(dirs) == 1
    assert sum(out.count("preparing data") for out in outs) == 1  # the other process waited and reused it


def test_a_killed_preparation_leaves_no_half_cache(tmp_path):
    script = ("from labs_lib.data.text import prepare_data; "
              f"prepare_data(None, 1024, 2_000_000, cache_dir={str(tmp_path)!r})")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert "preparing data" in proc.stdout.readline()  # now training the tokenizer
    proc.kill()
    proc.wait()
    entries = [p for p in (tmp_path / "data").iterdir() if p.is_dir()]
    assert all(p.name.startswith(".tmp-") or (p / "meta.json").exists() for p in entries)
    info = prepare_data(None, 1024, 2_000_000, cache_dir=tmp_path, progress=False)
    assert info.n_train_tokens > 0
    assert [p.name for p in (tmp_path / "data").iterdir() if p.is_dir()] == [info.dir.name]  # stale temp removed


def test_custom_file_and_folder(tmp_path):
    text = "the quick brown fox jumps over the lazy dog\n" * 200
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(text)
    (tmp_path / "corpus" / "sub").mkdir()
    (tmp_path / "corpus" / "sub" / "b.md").write_text("# title\nsome *markdown* here\n" * 100)
    (tmp_path / "corpus" / "image.png").write_bytes(b"\x89PNG not text")
    assert [f.name for f in corpus_files(tmp_path / "corpus")] == ["a.txt", "b.md"]
    assert corpus_files(tmp_path / "corpus" / "a.txt") == [tmp_path / "corpus" / "a.txt"]

    for source in (tmp_path / "corpus" / "a.txt", str(tmp_path / "corpus")):
        info = prepare_data(source, 300, cache_dir=tmp_path / "cache", progress=False)
        tok = load_tokenizer(info.tokenizer_path)
        assert 257 < info.vocab_size <= 300
        assert decode(tok, encode(tok, text)) == text
        assert info.n_train_tokens > 0 and info.n_val_tokens > 0


def test_missing_or_empty_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass a text file"):
        prepare_data(tmp_path / "nope.txt", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        corpus_files(tmp_path / "empty")
    with pytest.raises(ValueError, match="at least 257"):
        prepare_data(None, 100, 1000, cache_dir=tmp_path)


def test_y_is_x_shifted(stream):
    x, y = next(TokenBatches(stream, 4, 16, dtype=np.uint16))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)
    assert (x[:, 0] % 17 == 0).all()  # non-overlapping windows of seq_len + 1 tokens


def test_two_ranks_see_what_one_process_sees(stream):
    one = TokenBatches(stream, 8, 16, seed=3, dtype=np.uint16)
    ranks = [TokenBatches(stream, 4, 16, rank=r, world_size=2, seed=3, dtype=np.uint16) for r in range(2)]
    for _ in range(one.batches_per_epoch + 3):  # across an epoch boundary too
        x, y = next(one)
        (x0, y0), (x1, y1) = next(ranks[0]), next(ranks[1])
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())


def test_resume_continues_exactly(stream):
    a = TokenBatches(stream, 4, 16, seed=1, dtype=np.uint16)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint's JSON
    expected = [next(a) for _ in range(40)]
    b = TokenBatches(stream, 4, 16, seed=1, dtype=np.uint16)
    b.load_state_dict(state)
    assert state["batches_drawn"] == 5
    for (x, y), (bx, by) in zip(expected, (next(b) for _ in range(40))):
        assert torch.equal(x, bx) and torch.equal(y, by)
    with pytest.raises(ValueError, match="seq_len"):
        TokenBatches(stream, 4, 8, seed=1, dtype=np.uint16).load_state_dict(state)


def test_epochs_cover_every_window_once_and_reshuffle(stream):
    b = TokenBatches(stream, 4, 16, seed=0, dtype=np.uint16)
    n = b.batches_per_epoch
    assert b.n_windows == 10_000 // 17 and n == b.n_windows // 4
    epochs = [[next(b)[0][:, 0] // 17 for _ in range(n)] for _ in range(2)]
    first, second = (torch.cat(e).tolist() for e in epochs)
    assert len(set(first)) == len(first) == n * 4  # no window twice; the partial last batch is dropped
    assert sorted(first) == sorted(second) and first != second  # same windows, another order
    assert b.state_dict()["epoch"] == 2
    same, other = (next(TokenBatches(stream, 4, 16, seed=s, dtype=np.uint16))[0][:, 0] // 17 for s in (0, 1))
    assert same.tolist() == first[:4] and other.tolist() != first[:4]


def test_too_little_data_is_a_clear_error(stream):
    with pytest.raises(ValueError, match=r"10,000 tokens.*needs 16,016.*lower batch_size or seq_len"):
        TokenBatches(stream, 8, 1000, rank=1, world_size=2, dtype=np.uint16)
    TokenBatches(stream, 4, 1000, rank=1, world_size=2, dtype=np.uint16)  # 8,008 tokens: just enough


def test_eval_batches_are_fixed_and_rank_sharded(stream, small_data):
    a = eval_batches(stream, 4, 16, 3, dtype=np.uint16)
    assert len(a) == 3 and all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a, eval_batches(stream, 4, 16, 3,
                                                                                              dtype=np.uint16)))
    one = eval_batches(stream, 8, 16, 3, dtype=np.uint16)
    r0, r1 = (eval_batches(stream, 4, 16, 3, rank=r, world_size=2, dtype=np.uint16) for r in range(2))
    for (x, _), (x0, _), (x1, _) in zip(one, r0, r1):
        assert torch.equal(torch.cat([x0, x1]), x)
    x, y = eval_batches(small_data.val_path, 2, 32, 1)[0]  # dtype from meta.json
    assert x.shape == (2, 32) and int(x.max()) < small_data.vocab_size
