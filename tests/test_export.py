"""labs_lib.inference.export: a trained run to transformers' GPT-2 format and to ONNX with a KV cache.

The HF folder is read with transformers alone and must compute our logits and, through transformers' own
``generate``, our greedy and beam-search tokens; the ONNX graph in ONNX Runtime must compute forward_cached's
logits and keys / values (prefill and decoding steps, two batch sizes) and our greedy tokens. A run trained with
tensor parallelism exports like any other. The command line's errors are one line, with no traceback.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from labs_lib.core import checkpoint
from labs_lib.core.config import GPTConfig
from labs_lib.data.text import EOT, decode, encode
from labs_lib.inference import export
from labs_lib.inference.cache import GrowingCache, forward_cached
from labs_lib.inference.generate import Decoding, generate_ids, load_trained
from labs_lib.models.gpt import GPT

from conftest import REPO, run_train

PROMPTS = ["def ", "import os\n", "class Foo(object):\n    def __init__(self", "    return "]
NEW = 24  # new tokens per prompt
TEXTS = ["def foo(x):\n    return x + 1\n", f"a{EOT}b  \t\n\n  ü € 🙂 ", "    if self._cache is None:"]


@pytest.fixture(scope="module")
def trained(trained_run):
    model, tokenizer, _ = load_trained(trained_run)
    return model, tokenizer, tokenizer.token_to_id(EOT)


@pytest.fixture(scope="module")
def hf_dir(trained_run, tmp_path_factory):
    return export.export_hf_run(trained_run, tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def hf(hf_dir):
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    return (GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True).eval(),
            PreTrainedTokenizerFast.from_pretrained(hf_dir, local_files_only=True))


@pytest.fixture(scope="module")
def onnx_dir(trained_run, tmp_path_factory):
    return export.export_onnx_run(trained_run, tmp_path_factory.mktemp("export") / "onnx").parent


def test_hf_export_loads_with_transformers_alone(trained, hf_dir, hf):
    from transformers import AutoTokenizer

    model, tokenizer, eot = trained
    hf_model, hf_tok = hf
    for name in ("config.json", "generation_config.json"):
        assert json.loads((hf_dir / name).read_text())["eos_token_id"] == eot, name
    assert hf_model.generation_config.eos_token_id == hf_model.generation_config.pad_token_id == eot
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == hf_tok.pad_token_id == hf_tok.unk_token_id == eot
    assert hf_tok.padding_side == "left" and hf_tok.model_max_length == model.config.block_size
    auto = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    for text in TEXTS + PROMPTS:
        ids = encode(tokenizer, text)
        assert hf_tok(text)["input_ids"] == auto(text)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == decode(tokenizer, ids) == text
    batch = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(batch)[0], hf_model(batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def _hf_new_tokens(hf_model, prompt_ids: list[int], d: Decoding) -> list[int]:
    """transformers' generate on one prompt (no padding), cut after the first end of text."""
    kwargs = dict(num_beams=d.num_beams, length_penalty=d.length_penalty,
                  early_stopping=d.early_stopping) if d.num_beams > 1 else {}
    if d.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = d.repetition_penalty
    if d.bad_words:
        kwargs["bad_words_ids"] = [list(word) for word in d.bad_words]
    ids = torch.tensor([prompt_ids])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=d.max_new_tokens,
                            do_sample=False, eos_token_id=d.eos_token_id, pad_token_id=d.eos_token_id, **kwargs)
    new = out[0, ids.size(1):].tolist()
    return new[:new.index(d.eos_token_id) + 1] if d.eos_token_id in new else new


def _finishing_eos(model, tokenizer, prompts: list[list[int]], d: Decoding) -> int:
    """An end-of-text token that makes some of our beams finish before NEW tokens (the model rarely ends a text
    that soon): the first of a few common tokens that does."""
    for text in (" ", "\n", ",", "(", "_", ":"):
        ids = encode(tokenizer, text)
        if len(ids) == 1 and any(len(row) < NEW for row in generate_ids(model, prompts,
                                                                        replace(d, eos_token_id=ids[0]))):
            return ids[0]
    pytest.fail("no common token ends a beam early: pick other candidates")


@pytest.mark.parametrize("settings", [dict(), dict(repetition_penalty=1.3), dict(num_beams=5),
                                      dict(num_beams=5, finishing=True)],
                         ids=["greedy", "repetition-penalty", "beam-search", "beam-search-finishing"])
def test_transformers_generate_gives_our_tokens(trained, hf, settings):
    """Ours and transformers' generate, prompt by prompt, ending at <|endoftext|>; the last case ends at a common
    token instead, so that beams finish early and the stopping heuristic decides."""
    model, tokenizer, eot = trained
    settings = dict(settings)
    finishing = settings.pop("finishing", False)
    d = Decoding(max_new_tokens=NEW, temperature=0, eos_token_id=eot, **settings)
    prompts = [encode(tokenizer, p) for p in PROMPTS]
    if finishing:
        d = replace(d, eos_token_id=_finishing_eos(model, tokenizer, prompts, d))
    theirs = [_hf_new_tokens(hf[0], p, d) for p in prompts]
    assert theirs == generate_ids(model, prompts, d)


@pytest.mark.parametrize("beams", [1, 5], ids=["greedy", "beam-search"])
def test_transformers_bad_words_ids_give_our_tokens(trained, hf, beams):
    """Words taken from our own output, so that banning them changes it: one token, two tokens of the new text,
    two whose first is the prompt's last; transformers' generate(bad_words_ids=...) gives the same tokens."""
    model, tokenizer, eot = trained
    d = Decoding(max_new_tokens=NEW, temperature=0, eos_token_id=eot, num_beams=beams)
    for prompt in [encode(tokenizer, p) for p in PROMPTS[:2]]:
        free = generate_ids(model, [prompt], d)[0]
        for word in ((free[2],), (free[3], free[4]), (prompt[-1], free[0])):
            banned = replace(d, bad_words=(word,))
            ours = generate_ids(model, [prompt], banned)[0]
            assert ours != free and ours == _hf_new_tokens(hf[0], prompt, banned), word


def test_transformers_left_padded_batch_gives_our_tokens(trained, hf):
    """One left-padded batch through the exported tokenizer's padding, greedy, against ours (also a batch)."""
    model, tokenizer, eot = trained
    hf_model, hf_tok = hf
    enc = hf_tok(PROMPTS, padding=True, return_tensors="pt")
    out = hf_model.generate(**enc, max_new_tokens=NEW, do_sample=False, eos_token_id=eot, pad_token_id=eot)
    theirs = []
    for row in out[:, enc["input_ids"].size(1):].tolist():
        theirs.append(row[:row.index(eot) + 1] if eot in row else row)
    d = Decoding(max_new_tokens=NEW, temperature=0, eos_token_id=eot)
    assert theirs == generate_ids(model, [encode(tokenizer, p) for p in PROMPTS], d)


def _torch_step(model, ids, positions, mask, past):
    cache = GrowingCache([(past[i], past[i + 1]) for i in range(0, len(past), 2)])
    with torch.no_grad():
        logits = forward_cached(model, ids, cache, positions, mask)
    return logits, [t for kv in cache.present for t in kv]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_matches_forward_cached(trained, onnx_dir, batch):
    """Prefill (past 0, the first row unpadded, the others left-padded), two decoding steps of one token and a
    step of three tokens after them: logits and presents within 1e-4 of torch's."""
    model, _, _ = trained
    g = export.OnnxGenerator(onnx_dir)
    rng = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, 9), generator=rng)
    mask = torch.ones(batch, 9, dtype=torch.long)
    for row in range(1, batch):
        mask[row, :2 * row] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    onnx_past = g.empty_past(batch)
    torch_past = [torch.from_numpy(p) for p in onnx_past]
    for new in (9, 1, 1, 3):
        if new != 9:
            ids = torch.randint(0, model.config.vocab_size, (batch, new), generator=rng)
            positions = positions[:, -1:] + torch.arange(1, new + 1)
            mask = torch.cat((mask, torch.ones(batch, new, dtype=torch.long)), dim=1)
        logits, torch_past = _torch_step(model, ids, positions, mask, torch_past)
        onnx_logits, onnx_past = g.step(ids.numpy(), positions.numpy(), mask.numpy(), onnx_past)
        assert onnx_logits.shape == (batch, new, model.config.vocab_size)
        np.testing.assert_allclose(onnx_logits, logits.numpy(), atol=1e-4, rtol=0)
        for a, b in zip(onnx_past, torch_past):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=0)


def test_onnx_greedy_gives_our_tokens(trained, onnx_dir):
    model, tokenizer, eot = trained
    config = json.loads((onnx_dir / "config.json").read_text())
    c = model.config
    assert {k: config[k] for k in ("n_layer", "n_head", "head_dim", "vocab_size", "block_size", "eos_token_id")} == \
        dict(n_layer=c.n_layer, n_head=c.n_head, head_dim=c.head_dim, vocab_size=c.vocab_size,
             block_size=c.block_size, eos_token_id=eot)
    assert (onnx_dir / "tokenizer.json").exists()
    prompts = [encode(tokenizer, p) for p in PROMPTS]
    ours = generate_ids(model, prompts, Decoding(max_new_tokens=NEW, temperature=0, eos_token_id=eot))
    assert export.onnx_generate_ids(export.onnx_session(onnx_dir), prompts, NEW) == ours
    with pytest.raises(ValueError, match="context"):
        export.onnx_generate_ids(export.onnx_session(onnx_dir), prompts, c.block_size)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "labs_lib.export", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_writes_the_hf_folder(trained_run, hf_dir, tmp_path):
    result = _cli("--checkpoint", trained_run, "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes(), name


def test_cli_errors_are_one_line(trained_run, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_run, damaged)
    weights = checkpoint.latest_checkpoint(damaged / "checkpoints") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases = [(["--checkpoint", tmp_path / "missing", "--format", "hf"], "does not exist"),
             (["--checkpoint", trained_run, "--format", "gguf"], "--format hf"),
             (["--checkpoint", damaged, "--format", "onnx"], "damaged")]
    for args, fix in cases:
        result = _cli(*args, "--out", tmp_path / "out")
        assert result.returncode != 0, args
        assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
        assert result.stderr.startswith("error: ") and fix in result.stderr, result.stderr


def test_moe_run_is_refused_with_the_fix(trained_run, tmp_path):
    config = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32, n_experts=4)
    run = tmp_path / "moe"
    tmp = checkpoint.begin(run / "checkpoints", 1)
    checkpoint.write_main_state(tmp, GPT(config).state_dict(), None, {"model": config.to_dict(), "step": 1})
    checkpoint.commit(tmp, keep=1)
    shutil.copy(trained_run / "tokenizer.json", run / "tokenizer.json")
    for fmt in export.FORMATS:
        with pytest.raises(SystemExit, match="export a dense GPT"):
            export.main(["--checkpoint", str(run), "--format", fmt, "--out", str(tmp_path / fmt)])


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2, micro_batches=2), dict(zero_stage=3)],
                         ids=["tp2", "pp2", "zero3"])
def test_a_parallel_run_exports_like_its_single_device_load(tmp_path, layout):
    """TP, PP and ZeRO-3 runs (2 ranks) save whole single-device weights: they load and export like any run."""
    from transformers import GPT2LMHeadModel

    run = tmp_path / "run"
    run_train(run, nproc=2, max_steps=4, warmup_steps=1, block_size=64, eval_interval=4, checkpoint_interval=4,
              env={"OMP_NUM_THREADS": "1"}, **layout)
    model, _, meta = load_trained(run)
    saved = dict(meta["parallel"], zero_stage=meta["train"]["zero_stage"])
    assert all(saved[k] == v for k, v in layout.items()), meta
    hf_model = GPT2LMHeadModel.from_pretrained(export.export_hf_run(run, tmp_path / "hf"), local_files_only=True)
    batch = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model.eval()(batch).logits, model(batch)[0], atol=1e-5, rtol=0)
