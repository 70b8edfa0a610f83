"""Lab 09, inference and model reduction: the lab's model, its exercises' checks, and the measurements.

    run = train_base(out)                                   # the lab's GPT through the one launcher (Slurm when up)
    print_setup(lab_profile())                              # (labs.common) the profile with the lab's GPT
    model, tokenizer, meta = load_trained(run); data = run_data(run)
    serving_table(profile), crossovers(profile)             # weights vs KV cache: our GPT and GPT-3 175B, tp 1 / 8
    check_cached_attention(fn); check_top_p(fn); check_quantize(fn)       # the three exercises
    per_token_times(model, contexts), flop_ratio(model)     # a step with and without the cache, by context length
    latency_s(model, prompt), tokens_per_s(model, prompt, batch)          # the course's measures
    hf_baseline(run, out, prompt)                           # transformers on the HF export: greedy, beams, latency
    reduction_rows(model, data, out)                        # every reduction: bytes, latency, tokens/s, perplexity

The generation, export and reductions are labs_lib.inference's; the expected values of the checks are computed
here, out of the notebook's sight.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from labs_lib.core.config import Profile, get_profile, override
from labs_lib.data.text import DataInfo, prepare_data
from labs_lib.inference.cache import KVCache, forward_cached
from labs_lib.inference.generate import Decoding, generate_ids, process_logits
from labs_lib.labs.checks import check

__all__ = ["MODEL", "STEPS", "NEW_TOKENS", "EVAL_SEQ", "lab_profile", "train_base", "run_data", "serving_table",
           "crossovers", "check_cached_attention", "check_top_p", "check_quantize", "per_token_times", "flop_ratio",
           "latency_s", "tokens_per_s", "cache_speedup", "hf_baseline", "measure", "quantization_rows",
           "pruning_rows", "distillation"]

# The lab's GPT per profile: a context long enough for the course's 128-token generations (and the benchmark's
# 256), wide enough that a decoding step does real work (the ci profile's lab 01 GPT is all overhead).
MODEL = {"ci": dict(n_layer=4, n_head=4, n_embd=192, block_size=320),
         "cpu": dict(n_layer=4, n_head=4, n_embd=192, block_size=384),
         "gpu": {}}
STEPS = {"ci": 150, "cpu": 600, "gpu": None}  # a teacher the half-size student can learn from
NEW_TOKENS = 128  # the closed course's latency measure: a 128-token generation, median of 10


def lab_profile(profile: str | None = None) -> Profile:
    """The run profile with the lab's GPT and training steps in place of the profile's own."""
    base = get_profile(profile)
    steps = STEPS[base.name] or base.train.max_steps
    return replace(base, model=override(base.model, **MODEL[base.name]), train=override(base.train, max_steps=steps))


def train_base(out: str | Path, profile: str | None = None, progress: bool = True) -> Path:
    """Train the lab's GPT (one rank: two on two cores would not be faster) through the one launcher; returns the
    run folder."""
    from labs_lib.jobs.launch import train_gpt

    name = get_profile(profile).name
    settings = dict(MODEL[name], **({"max_steps": STEPS[name]} if STEPS[name] else {}))
    train_gpt(out, nodes=1, nproc_per_node=1, profile=profile, progress=progress, **settings)
    return Path(out)


def run_data(run: str | Path) -> DataInfo:
    """The corpus a run trained on (its train / val tokens), from the run's config (prepared once, then cached)."""
    train = json.loads((Path(run) / "config.json").read_text())["train"]
    return prepare_data(train["data"], train["tokenizer_vocab"], train["corpus_max_bytes"], train["val_fraction"],
                        progress=False)


def serving_table(profile: str | None = None, batches=(1, 8, 32, 128)) -> list[dict]:
    """Weights and KV cache per GPU (16-bit) at the full context: the lab's GPT, GPT-3 175B at tp 1 and 8."""
    from labs_lib.estimates.memory import param_count
    from labs_lib.estimates.serving import serving_rows
    from labs_lib.planner.presets import model_preset

    cfg = lab_profile(profile).model
    gpt3 = model_preset("gpt3-175b")
    rows = [dict(model="lab GPT", **r) for r in serving_rows(param_count(cfg), cfg.n_layer, cfg.n_embd,
                                                             list(batches), cfg.block_size)]
    for tp in (1, 8):
        rows += [dict(model="GPT-3 175B", **r) for r in serving_rows(gpt3.params(), gpt3.layers, gpt3.hidden,
                                                                     list(batches), gpt3.seq, tp=tp)]
    return rows


def crossovers(profile: str | None = None) -> dict[str, float]:
    """Tokens in flight at which the KV cache weighs as much as the weights: the lab's GPT and GPT-3 175B."""
    from labs_lib.estimates.memory import param_count
    from labs_lib.estimates.serving import kv_equals_weights_tokens
    from labs_lib.planner.presets import model_preset

    cfg, gpt3 = lab_profile(profile).model, model_preset("gpt3-175b")
    return {"lab GPT": kv_equals_weights_tokens(param_count(cfg), cfg.n_layer, cfg.n_embd),
            "GPT-3 175B": kv_equals_weights_tokens(gpt3.params(), gpt3.layers, gpt3.hidden)}


# ------------------------------------------------------------------------------------------------ exercises

def _exercise_attention(seed: int = 9):
    from labs_lib.core.config import GPTConfig
    from labs_lib.models.gpt import CausalSelfAttention

    torch.manual_seed(seed)
    attn = CausalSelfAttention(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=4, n_embd=32)).eval()
    return attn, torch.randn(2, 12, 32)


def check_cached_attention(fn) -> bool:
    """Exercise 1: ``fn(attn, x_new, past_k, past_v) -> (y, k, v)`` is one decoding step of the attention with a
    cache: it must give the full causal attention's output at the new position, and return the keys / values
    with the new token's appended."""
    if fn is None or fn is Ellipsis:
        return check("cached attention", None, None, hint="write cached_attention(attn, x_new, past_k, past_v).")
    attn, x = _exercise_attention()
    with torch.no_grad():
        full = attn(x)[:, -1:]
        _, past_k, past_v = attn.split_heads(x[:, :-1])  # what a cache holds after the prompt
        result = fn(attn, x[:, -1:], past_k, past_v)
    if result in (None, Ellipsis):
        return check("cached attention", None, None, hint="cached_attention still returns ...: write its body.")
    y, k, v = result
    if tuple(k.shape) != (2, 4, x.size(1), 8) or tuple(v.shape) != tuple(k.shape):
        raise AssertionError(f"❌ cached attention: keys and values must be (batch, heads, past + 1, head_dim) = "
                             f"(2, 4, {x.size(1)}, 8), got {tuple(k.shape)}: concatenate the new ones on dim 2")
    if not torch.allclose(y, full, atol=1e-5):
        raise AssertionError("❌ cached attention: the output differs from the full causal attention's at the new "
                             "position: attend with the new query over all keys (no causal mask needed for one "
                             "query), then apply attn.proj")
    print("✅ cached attention: one step with the cache gives the full attention's output")
    return True


def check_top_p(fn) -> bool:
    """Exercise 2: ``fn(logits, p)`` returns the logits with every token outside the nucleus set to -inf."""
    if fn is None or fn is Ellipsis:
        return check("top-p", None, None, hint="write top_p_filter(logits, p).")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 3
    none = torch.zeros(4, 1, dtype=torch.long)
    for p in (0.5, 0.9, 1.0):
        got = fn(logits.clone(), p)
        if got is None or got is Ellipsis:
            return check("top-p", None, None, hint="top_p_filter still returns ...: write its body.")
        want = process_logits(logits, none, torch.zeros_like(none, dtype=torch.bool), Decoding(temperature=1.0,
                                                                                               top_p=p))
        if not torch.equal(got.isfinite(), want.isfinite()):
            kept, wanted = int(got.isfinite().sum()), int(want.isfinite().sum())
            raise AssertionError(f"❌ top-p, p={p}: kept {kept} tokens, expected {wanted}: keep the most likely "
                                 "tokens until their probabilities sum to at least p (always the best one)")
        if not torch.allclose(got[got.isfinite()], logits[want.isfinite()]):
            raise AssertionError(f"❌ top-p, p={p}: the kept logits changed: only set the others to -inf")
    print("✅ top-p: the nucleus is right for p = 0.5, 0.9 and 1")
    return True


def check_quantize(fn) -> bool:
    """Exercise 3: ``fn(w) -> (q, scale)``: symmetric int8 per output channel (row), error at most scale / 2."""
    if fn is None or fn is Ellipsis:
        return check("int8 per channel", None, None, hint="write quantize_per_channel(w).")
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.01, 2, 48)[:, None]
    result = fn(w.clone())
    if result is None or result is Ellipsis:
        return check("int8 per channel", None, None, hint="quantize_per_channel still returns ...: write its body.")
    q, scale = result
    if q.dtype != torch.int8 or tuple(q.shape) != (48, 64):
        raise AssertionError(f"❌ int8 per channel: q must be int8 of w's shape (48, 64), got {q.dtype} "
                             f"{tuple(q.shape)}")
    scale = scale.reshape(-1, 1).float()
    if scale.numel() != 48:
        raise AssertionError(f"❌ int8 per channel: one scale per output row (48), got {scale.numel()}")
    want = w.abs().amax(dim=1, keepdim=True) / 127
    if not torch.allclose(scale, want, rtol=1e-5):
        raise AssertionError("❌ int8 per channel: scale = max |w| of the row / 127 (symmetric: the largest value "
                             "maps to ±127)")
    error = (q.float() * scale - w).abs()
    if bool((error > scale / 2 + 1e-6).any()):
        raise AssertionError("❌ int8 per channel: some values are off by more than half a step: round to the "
                             "nearest integer (torch.round), then clamp to [-127, 127]")
    print(f"✅ int8 per channel: error at most scale / 2 (largest {float((error / scale).max()):.3f} steps)")
    return True


# ---------------------------------------------------------------------------------------------- measurements

def _prompt_batch(prompt: list[int], batch: int) -> list[list[int]]:
    return [list(prompt) for _ in range(batch)]


def latency_s(model, prompt: list[int], new_tokens: int = NEW_TOKENS, runs: int = 10) -> float:
    """The median wall time of a ``new_tokens``-token greedy generation at batch 1 (after one warm-up)."""
    d = Decoding(new_tokens, temperature=0)
    generate_ids(model, [prompt], Decoding(4, temperature=0))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        generate_ids(model, [prompt], d)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tokens_per_s(model, prompt: list[int], batch: int, new_tokens: int = NEW_TOKENS, runs: int = 3) -> float:
    """Generated tokens per second at ``batch`` sequences (greedy, the best of ``runs``)."""
    d = Decoding(new_tokens, temperature=0)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        generate_ids(model, _prompt_batch(prompt, batch), d)
        best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


@torch.no_grad()
def per_token_times(model, contexts: list[int], repeats: int = 5) -> list[dict]:
    """Seconds for one new token at each context length: the whole context again (no cache) vs one token with
    the cache (median of ``repeats``)."""
    rows = []
    for context in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, context + 1))
        uncached, cached = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            uncached.append(time.perf_counter() - start)
            cache = KVCache(context + 1)
            forward_cached(model, ids[:, :context], cache, torch.arange(context)[None])
            start = time.perf_counter()
            forward_cached(model, ids[:, context:], cache, torch.tensor([[context]]))
            cached.append(time.perf_counter() - start)
        rows.append({"context": context, "uncached_s": statistics.median(uncached),
                     "cached_s": statistics.median(cached)})
    return rows


def flop_ratio(model):
    """FLOPs of a step without the cache over a step with it, at context c (forward only): the whole context
    (2·N per token, and attention's 2·L·h·c² for all queries) against one token (2·N, and 4·L·h·c for one
    query over c keys). N: the parameters used in matmuls (all but the position embedding)."""
    n, layers, h = model.num_params(non_embedding=True), model.config.n_layer, model.config.n_embd
    return lambda c: (2 * n * c + 2 * layers * h * c * c) / (2 * n + 4 * layers * h * c)


def cache_speedup(model, prompt: list[int], new_tokens: int = 256) -> dict:
    """Wall time of ``new_tokens`` greedy tokens recomputing the context each step (GPT.generate) vs with the
    KV cache; both produce the same tokens (checked)."""
    start = time.perf_counter()
    reference = model.generate(torch.tensor([prompt]), new_tokens, temperature=0)[0, len(prompt):].tolist()
    uncached = time.perf_counter() - start
    start = time.perf_counter()
    cached_ids = generate_ids(model, [prompt], Decoding(new_tokens, temperature=0))[0]
    cached = time.perf_counter() - start
    if cached_ids != reference:
        raise AssertionError("the cached generation departs from the reference: a bug in labs_lib.inference.cache")
    return {"new_tokens": new_tokens, "uncached_s": uncached, "cached_s": cached, "speedup": uncached / cached}


def hf_baseline(run: str | Path, out: str | Path, prompt: str, new_tokens: int = NEW_TOKENS, runs: int = 10,
                num_beams: int = 5, repetition_penalty: float = 1.3) -> dict:
    """The closed course's starting point, on our GPT: the run exported to the HF format (``out``), run by
    transformers in eval mode. Returns its greedy and beam-search texts and the median latency of a
    ``new_tokens``-token greedy generation, beside ours on the same weights and threads."""
    from transformers import GPT2LMHeadModel

    from labs_lib.inference.export import export_hf_run
    from labs_lib.inference.generate import load_trained
    from labs_lib.models.hf import _quiet_transformers

    model, tokenizer, _ = load_trained(run)
    path = export_hf_run(run, out)
    with _quiet_transformers():
        hf = GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True).eval()
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    common = dict(max_new_tokens=new_tokens, pad_token_id=hf.config.eos_token_id)

    def text(generated):
        return tokenizer.decode(generated[0, ids.size(1):].tolist())

    with torch.no_grad(), _quiet_transformers():
        greedy = text(hf.generate(ids, do_sample=False, **common))
        beams = text(hf.generate(ids, do_sample=False, num_beams=num_beams, repetition_penalty=repetition_penalty,
                                 **common))
        fixed = dict(common, min_new_tokens=new_tokens, do_sample=False)  # exactly new_tokens, like ours
        hf.generate(ids, **dict(fixed, max_new_tokens=4, min_new_tokens=4))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            hf.generate(ids, **fixed)
            times.append(time.perf_counter() - start)
    return {"greedy": greedy, "beams": beams, "hf_latency_s": statistics.median(times),
            "our_latency_s": latency_s(model, ids[0].tolist(), new_tokens, runs)}


# ------------------------------------------------------------------------------------------------- reductions

EVAL_SEQ = 128  # perplexity windows, and the fine-tunes' sequence length: one measure for every row
EVAL_BATCHES = 8


def measure(model, variant: str, data: DataInfo, prompt: list[int], runs: int = 10, batch: int = 8,
            speed: bool = True, new_tokens: int = NEW_TOKENS) -> dict:
    """One row of the reduction table: bytes, the course's latency (128 tokens, median of ``runs``), generated
    tokens/s at batch 1 and ``batch``, validation perplexity. ``speed=False``: size and perplexity only."""
    from labs_lib.inference.distill import perplexity
    from labs_lib.inference.quantize import model_bytes

    row = {"variant": variant, "MB": model_bytes(model) / 1e6, "latency ms": "", "tok/s b1": "",
           f"tok/s b{batch}": "", "perplexity": perplexity(model, data.val_path, EVAL_SEQ, EVAL_BATCHES)}
    if speed:
        row.update({"latency ms": 1e3 * latency_s(model, prompt, new_tokens, runs),
                    "tok/s b1": tokens_per_s(model, prompt, 1, new_tokens, runs=1),
                    f"tok/s b{batch}": tokens_per_s(model, prompt, batch, new_tokens, runs=1)})
    return row


def quantization_rows(model, data: DataInfo, prompt: list[int], runs: int = 10) -> list[dict]:
    """fp32, bf16, fp16, int8 weight-only (ours), torch's dynamic int8, int4 weight-only (groups of 32)."""
    from labs_lib.inference.quantize import cast, quantize_model, torch_int8

    variants = {"fp32": model, "bf16": cast(model, torch.bfloat16), "fp16": cast(model, torch.float16),
                "int8 weight-only (ours)": quantize_model(model, bits=8),
                "int8 dynamic (torch)": torch_int8(model),
                "int4 weight-only, groups of 32 (ours)": quantize_model(model, bits=4, group_size=32)}
    return [measure(m, name, data, prompt, runs) for name, m in variants.items()]


def _fine_tune_settings(profile: str | None) -> dict:
    steps = {"ci": 30, "cpu": 100, "gpu": 300}[get_profile(profile).name]
    return dict(steps=steps, lr=3e-4, batch_size=8, seq_len=EVAL_SEQ)  # the rate training ended at: no jolt


def pruning_rows(model, data: DataInfo, prompt: list[int], out: str | Path, profile: str | None = None,
                 runs: int = 10) -> tuple[list[dict], dict[str, list[dict]]]:
    """Half of every block matrix zeroed by magnitude, half the heads, half the MLP channels: each measured
    before and after a short recovery fine-tune. Returns (rows, the fine-tunes' records)."""
    import copy

    from labs_lib.inference.prune import magnitude_prune, prune_heads, prune_mlp, recover

    out, tune = Path(out), _fine_tune_settings(profile)
    rows, records = [], {}
    for name in ("magnitude 50%", "heads 50%", "MLP channels 50%"):
        pruned, masks = copy.deepcopy(model), None
        if name.startswith("magnitude"):
            masks = magnitude_prune(pruned, 0.5)  # zeros in place; the masks keep them zero while it recovers
        elif name.startswith("heads"):
            prune_heads(pruned, keep_heads=max(1, model.config.n_head // 2))
        else:
            prune_mlp(pruned, keep_fraction=0.5)
        rows.append(measure(pruned, f"{name}, pruned", data, prompt, speed=False))  # the shapes of the next row
        records[name] = recover(pruned, data.train_path, out=out / name.replace(" ", "_").replace("%", ""),
                                masks=masks, val_path=data.val_path, **tune)
        pruned.eval()
        rows.append(measure(pruned, f"{name}, recovered", data, prompt, runs))
    return rows, records


def distillation(model, data: DataInfo, out: str | Path, profile: str | None = None,
                 steps: int | None = None) -> dict:
    """A student of half the parameters distilled from ``model``, and the same student (same initial weights,
    batches and steps) from scratch. Returns both models and their records.

    T = 1 and alpha = 0.9: with a small teacher trained briefly, softer targets (T = 2) or an even mix with the
    data's labels lost to the student from scratch in our measurements; the teacher's own distribution won."""
    import copy

    from labs_lib.inference.distill import distill, half_size_config, train_from_scratch
    from labs_lib.models.gpt import GPT

    out = Path(out)
    steps = steps or {"ci": 120, "cpu": 400, "gpu": 1000}[get_profile(profile).name]
    tune = dict(_fine_tune_settings(profile), steps=steps, lr=3e-3)
    torch.manual_seed(0)
    student = GPT(half_size_config(model.config))
    scratch = copy.deepcopy(student)
    distilled = distill(model, student, data.train_path, out=out / "distilled", val_path=data.val_path,
                        temperature=1.0, alpha=0.9, **tune)
    baseline = train_from_scratch(scratch, data.train_path, out=out / "scratch", val_path=data.val_path, **tune)
    return {"student": student.eval(), "scratch": scratch.eval(), "records": {"distilled": distilled,
                                                                               "from scratch": baseline}}
