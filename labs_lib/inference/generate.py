"""Text generation from a trained run: KV-cached, batched, with the usual decoding strategies.

    python -m labs_lib.generate --checkpoint build/runs/demo --prompt "def " --max-new-tokens 80
    python -m labs_lib.generate --checkpoint build/runs/demo --prompt "import " --temperature 0      # greedy
    python -m labs_lib.generate --checkpoint RUN --prompt "def " --temperature 0.8 --top-k 50 --top-p 0.95 \\
        --repetition-penalty 1.2 --stop "\\n\\n" --bad-word "print" --seed 1
    python -m labs_lib.generate --checkpoint RUN --prompt "class " --num-beams 5 --max-new-tokens 40

``--checkpoint`` is a run folder (its newest checkpoint is used) or one ``step_N`` folder of it. In code::

    model, tokenizer, meta = load_trained("build/runs/demo")
    texts = generate_text(model, tokenizer, ["def ", "import os"], Decoding(max_new_tokens=40, temperature=0))
    new_ids = generate_ids(model, [[12, 7], [3]], Decoding(temperature=0.8, top_p=0.9, seed=1))

Prompts of different lengths run as one left-padded batch; each row computes what it would alone. Processing
follows ``transformers``' order: repetition penalty on the logits, bad words, then temperature, top-k, top-p, then
sampling (greedy when the temperature is 0). A bad word (a token sequence, ``transformers``' ``bad_words_ids`` and
TensorRT-LLM's bad_words) is never generated: its last token is banned wherever the tokens so far, prompt included,
end with its other tokens (always, for a one-token word). Beam search (``num_beams`` > 1) is ``transformers``'
algorithm: the 2·beams best continuations of all beams each step, a beam that ends (end of text, or the length
limit) scored by its summed log-probabilities / length ** length_penalty, stopping once no open beam can beat the
worst kept one.
The uncached ``GPT.generate`` stays as the reference the tests hold this to.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from labs_lib.core import checkpoint
from labs_lib.core.config import GPTConfig
from labs_lib.data.text import EOT, decode, encode, load_tokenizer
from labs_lib.inference.cache import KVCache, forward_cached
from labs_lib.models.gpt import GPT

__all__ = ["Decoding", "ends_with_any", "load_trained", "generate_ids", "generate_text", "beam_search",
           "process_logits", "sample", "main"]


@dataclass
class Decoding:
    """How to pick each next token. ``temperature`` 0: greedy; ``num_beams`` > 1: beam search (no sampling)."""

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop at the first of these strings (text helpers only)
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never to generate
    eos_token_id: int | None = None  # end of text: a row that emits it is finished
    seed: int = 0

    def check(self, vocab_size: int | None = None) -> Decoding:
        """Raise a ValueError naming the fix for settings that contradict each other or make no sense (bad word
        ids outside ``vocab_size`` too, when given)."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens}: generate at least 1 token")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature}: use 0 for greedy or a positive value to sample")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k={self.top_k}: keep at least 1 token (or leave top_k unset)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p}: top-p must be in (0, 1] (1 keeps every token)")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty}: use 1.0 for none, > 1 to penalise repeats")
        if self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams}: use 1 (no beam search) or more")
        if self.num_beams > 1 and self.temperature != 0:
            problems.append(f"num_beams={self.num_beams} with temperature={self.temperature}: beam search does not "
                            "sample; set temperature 0 (or num_beams 1 to sample)")
        if self.num_beams > 1 and (self.top_k is not None or self.top_p is not None):
            problems.append("top_k / top_p filter sampling; beam search does not sample: drop them or num_beams")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            problems.append("top_k / top_p with temperature 0: greedy takes the best token anyway; set a "
                            "temperature > 0 to sample, or drop them")
        if any(len(word) == 0 for word in self.bad_words):
            problems.append("bad_words holds an empty word, which bans nothing: drop it")
        top = float("inf") if vocab_size is None else vocab_size
        outside = sorted({t for word in self.bad_words for t in word if not 0 <= t < top})
        if outside:
            known = "non-negative" if vocab_size is None else f"in the vocabulary 0..{vocab_size - 1}"
            problems.append(f"bad_words token ids {outside[:5]} are not {known}: encode the words with the run's "
                            "tokenizer")
        if problems:
            raise ValueError("bad decoding settings: " + "; ".join(problems))
        return self


def load_trained(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, checkpoint meta) of a run folder or step folder.

    A missing or unreadable checkpoint is a FileNotFoundError / ValueError saying which file and what to do."""
    ckpt, run = checkpoint.resolve_run(path)
    try:
        meta = checkpoint.load_meta(ckpt)
        model = GPT(GPTConfig(**meta["model"]))
        model.load_state_dict(checkpoint.load_model_state(ckpt))
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated file, foreign JSON, other shapes: one clear message, not a deep traceback
        raise ValueError(f"checkpoint {ckpt} cannot be read ({type(e).__name__}: {e}); it is damaged or not one of "
                         "this course's: pass another step folder, or train again") from None
    tokenizer_path = run / "tokenizer.json"
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"{tokenizer_path} is missing: the run folder must hold the tokenizer it trained with")
    return model.to(device).eval(), load_tokenizer(tokenizer_path), meta


def process_logits(logits: torch.Tensor, seen: torch.Tensor, seen_mask: torch.Tensor, d: Decoding) -> torch.Tensor:
    """Next-token scores (B, vocab) after repetition penalty, bad words, temperature, top-k and top-p (banned and
    filtered ones -inf).

    ``seen`` (B, S) the tokens so far, ``seen_mask`` which of them are real (padding is neither penalised nor part
    of a bad word). The repetition penalty (CTRL; transformers' rule) divides a seen token's positive score and
    multiplies a negative one by the penalty."""
    if d.repetition_penalty != 1.0:
        picked = logits.gather(1, seen)
        penalised = torch.where(picked < 0, picked * d.repetition_penalty, picked / d.repetition_penalty)
        logits = logits.scatter(1, seen, torch.where(seen_mask.bool(), penalised, picked))
    if d.bad_words:
        banned = torch.zeros_like(logits, dtype=torch.bool)
        for *prefix, last in d.bad_words:  # banned in the rows whose last real tokens are the prefix (none: all)
            start = seen.size(1) - len(prefix)
            if start >= 0:
                ends_with = (seen[:, start:] == seen.new_tensor(prefix)) & seen_mask[:, start:].bool()
                banned[:, last] |= ends_with.all(dim=1)
        logits = logits.masked_fill(banned, float("-inf"))
    if d.temperature == 0 or d.num_beams > 1:
        return logits
    logits = logits / d.temperature
    if d.top_k is not None and d.top_k < logits.size(-1):
        kth_best = torch.topk(logits, d.top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if d.top_p is not None and d.top_p < 1:
        # The smallest set of most likely tokens whose probabilities sum to at least top_p (the best one always).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        sorted_drop = probs.cumsum(dim=-1) - probs >= d.top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(sorted_drop).scatter(1, order, sorted_drop), float("-inf"))
    return logits


def ends_with_any(tokens: list[int], sequences) -> bool:
    """Whether ``tokens`` end with one of the token ``sequences`` (stop words): the one rule every engine stops by."""
    return any(len(tokens) >= len(s) and tuple(tokens[-len(s):]) == tuple(s) for s in sequences)


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (B, longest prompt): each prompt right-aligned, the mask True on its tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token: encode a non-empty prompt")
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, device=device)
        mask[row, width - len(p):] = True
    return ids, mask


def _check_length(model: GPT, longest_prompt: int, max_new_tokens: int) -> None:
    context = model.config.block_size
    if longest_prompt >= context:
        raise ValueError(f"the prompt has {longest_prompt} tokens and the model's context is {context}: shorten the "
                         f"prompt to under {context} tokens")
    if longest_prompt + max_new_tokens > context:
        raise ValueError(f"a {longest_prompt}-token prompt + {max_new_tokens} new tokens is past the model's context "
                         f"of {context}: ask for at most {context - longest_prompt} new tokens (or a shorter prompt)")


@torch.no_grad()
def generate_ids(model: GPT, prompts: list[list[int]], d: Decoding,
                 finished_when: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """The new tokens of each prompt, as one left-padded batch with a KV cache. A row ends with
    ``eos_token_id`` (included), or where ``finished_when(its new tokens)`` first holds (a stop string), or at
    ``max_new_tokens``. Beam search runs prompt by prompt (:func:`beam_search`)."""
    d.check(model.config.vocab_size)
    if d.num_beams > 1:
        return [beam_search(model, p, d) for p in prompts]
    device = model.ln_f.weight.device  # a float parameter every variant keeps (a quantized head dequantizes)
    ids, mask = _left_pad(prompts, device)
    _check_length(model, ids.size(1), d.max_new_tokens)
    generator = torch.Generator(device=device).manual_seed(d.seed)
    cache = KVCache(ids.size(1) + d.max_new_tokens)
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # real tokens count from 0 in every row
    logits = forward_cached(model, ids, cache, positions, mask)[:, -1]
    seen, seen_mask = ids, mask
    padded = not bool(mask.all())  # without padding a one-token step needs no mask at all (the fast path)
    out: list[list[int]] = [[] for _ in prompts]
    open_rows = set(range(len(prompts)))
    for step in range(d.max_new_tokens):
        scores = process_logits(logits.float(), seen, seen_mask, d)
        if d.temperature == 0:
            token = scores.argmax(dim=-1)
        else:
            token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]
        for row, t in enumerate(token.tolist()):
            if row in open_rows:
                out[row].append(t)
                if t == d.eos_token_id or (finished_when is not None and finished_when(out[row])):
                    open_rows.discard(row)
        if not open_rows or step == d.max_new_tokens - 1:
            break
        seen = torch.cat((seen, token[:, None]), dim=1)
        seen_mask = torch.cat((seen_mask, torch.ones_like(token[:, None], dtype=torch.bool)), dim=1)
        positions = positions[:, -1:] + 1
        logits = forward_cached(model, token[:, None], cache, positions, seen_mask if padded else None)[:, -1]
    return out


@torch.no_grad()
def beam_search(model: GPT, prompt: list[int], d: Decoding) -> list[int]:
    """The new tokens of the best beam for one prompt (transformers' beam search, see the module docstring).

    As in transformers, the repetition penalty and bad words act on the log-probabilities here."""
    d.check(model.config.vocab_size)
    device = model.ln_f.weight.device  # a float parameter every variant keeps (a quantized head dequantizes)
    _check_length(model, len(prompt), d.max_new_tokens)
    beams, width = d.num_beams, 2 * d.num_beams  # candidates kept per step: enough to continue beams after EOS
    cache = KVCache(len(prompt) + d.max_new_tokens)
    ids = torch.tensor([prompt], device=device)
    logits = forward_cached(model, ids, cache, torch.arange(len(prompt), device=device)[None])[:, -1]
    cache.reorder(torch.zeros(beams, dtype=torch.long, device=device))
    seqs = torch.tensor([prompt] * beams, device=device)
    scores = torch.full((beams,), -1e9, device=device)
    scores[0] = 0.0  # one beam at first: the copies must not all pick the same token
    logits = logits.expand(beams, -1)
    done: list[tuple[float, list[int]]] = []  # (score / length ** penalty, new tokens), best first, at most `beams`
    for step in range(d.max_new_tokens):
        log_probs = process_logits(F.log_softmax(logits.float(), dim=-1), seqs, torch.ones_like(seqs), d)
        total = (log_probs + scores[:, None]).view(-1)
        top_scores, top = torch.topk(total, width)
        parent, token = top // log_probs.size(-1), top % log_probs.size(-1)
        length = step + 1
        ends = torch.full_like(token, length == d.max_new_tokens, dtype=torch.bool)
        if d.eos_token_id is not None:
            ends |= token == d.eos_token_id
        full = len(done) == beams and d.early_stopping
        for rank in range(beams):  # only the best `beams` candidates may finish
            if ends[rank] and not full:
                tokens = seqs[parent[rank], len(prompt):].tolist() + [int(token[rank])]
                done.append((float(top_scores[rank]) / length ** d.length_penalty, tokens))
        done = sorted(done, key=lambda item: -item[0])[:beams]
        keep = torch.topk(top_scores - ends.float() * 1e9, beams).indices  # the best that go on
        if bool(ends.all()) or step == d.max_new_tokens - 1:
            break
        best_open = float(top_scores[keep[0]]) / length ** d.length_penalty
        if len(done) == beams and (d.early_stopping or best_open <= done[-1][0]):
            break  # no open beam can beat the worst kept one (transformers' heuristic for early_stopping=False)
        seqs = torch.cat((seqs[parent[keep]], token[keep, None]), dim=1)
        scores = top_scores[keep]
        cache.reorder(parent[keep])
        positions = torch.full((beams, 1), seqs.size(1) - 1, device=device)
        logits = forward_cached(model, token[keep, None], cache, positions)[:, -1]
    return done[0][1]


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def generate_text(model: GPT, tokenizer, prompts: str | list[str], d: Decoding) -> list[str]:
    """Each prompt's continuation (the new text only), cut before the first stop string and at end of text."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if d.eos_token_id is None:
        d = replace(d, eos_token_id=tokenizer.token_to_id(EOT))

    def text_of(new: list[int]) -> str:
        return decode(tokenizer, [t for t in new if t != d.eos_token_id])

    stopped = (lambda new: _cut_at_stop(text_of(new), d.stop)[1]) if d.stop else None
    rows = generate_ids(model, [encode(tokenizer, p) for p in prompts], d, stopped)
    return [_cut_at_stop(text_of(row), d.stop)[0] for row in rows]


def sample(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
           top_k: int | None = 50, seed: int = 0) -> str:
    """The prompt followed by a sampled continuation (labs 00-01's one-line use)."""
    top_k = top_k if temperature else None
    return prompt + generate_text(model, tokenizer, prompt, Decoding(max_new_tokens, temperature, top_k,
                                                                     seed=seed))[0]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.generate", description="Generate text from a trained run.")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoints/step_N folder")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default 'def '")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (with --temperature 0)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable); \\n is a newline")
    p.add_argument("--bad-word", action="append", default=[],
                   help="never generate this text (repeatable): its tokens, encoded alone; \\n is a newline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (seeds seed, seed+1, ...)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    unescaped = lambda strings: tuple(s.encode().decode("unicode_escape") for s in strings)
    stop, bad = unescaped(args.stop), unescaped(args.bad_word)
    try:
        d = Decoding(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                     args.num_beams, args.length_penalty, stop=stop, seed=args.seed).check()
        model, tokenizer, meta = load_trained(args.checkpoint)
        d = replace(d, bad_words=tuple(tuple(encode(tokenizer, w)) for w in bad))
        print(f"# step {meta['step']} of {args.checkpoint}", file=sys.stderr)
        for prompt in args.prompt or ["def "]:
            for i in range(args.num_samples):
                text = generate_text(model, tokenizer, prompt, replace(d, seed=args.seed + i))[0]
                print(prompt + text)
                print("-" * 40)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
