"""In-flight (continuous) batching over the paged KV cache, as TensorRT-LLM's batch manager does it.

Requests join and leave the running batch between steps, instead of a batch running until its longest member ends::

    batcher = InflightBatcher(model, num_blocks=64, block_size=16, policy="max_utilization", max_num_tokens=128)
    a = batcher.submit(prompt_ids, Decoding(max_new_tokens=40, temperature=0))
    batcher.step()                      # one packed forward: prefill chunks and decode tokens of every running request
    b = batcher.submit(other_ids, Decoding(10, temperature=0.8, top_k=20, seed=3), on_token=print)
    outputs = batcher.run_until_done()  # {request id: its new tokens}, what generate_ids gives each prompt alone

A step feeds at most ``max_num_tokens`` tokens (TensorRT-LLM's ``max_num_tokens``): one for each decoding sequence
first, then prefill chunks, oldest first (a prompt longer than what is left is split over steps: chunked prefill),
then newly admitted requests, for at most ``max_batch_size`` sequences. Admission follows the scheduler policy
(TensorRT-LLM's ``batch_scheduler_policy``), oldest request first, the first one that does not fit waiting with all
behind it:

- ``guaranteed_no_evict``: a request is admitted only if the free blocks, less those promised to the running
  sequences, hold everything it will ever need (its prompt and all its new tokens); nothing is ever evicted.
- ``max_utilization``: a request is admitted when its prompt's blocks are free now. When the running sequences then
  outgrow the pool, the newest is evicted (paused): its blocks are freed and it goes back to the head of the queue,
  to resume later by recomputing its prompt and the tokens it has made (its sampler's state is kept, so its output
  does not change).

Each request keeps its own :class:`~labs_lib.inference.generate.Decoding` (greedy, temperature, top-k, top-p,
repetition penalty, bad words, end id) applied by ``process_logits`` to its own row, and its own
``torch.Generator`` seeded with ``seed``: a request's tokens are what ``generate_ids`` gives its prompt alone.
It ends at its end id (included), at the first of its ``stop`` token sequences (included), or at ``max_new_tokens``.
``on_token(sequence)`` is called after each of its tokens (streaming; ``sequence.finished`` on the last one).

Exercise-style helpers: :func:`admission_cost` (the free blocks a policy asks of a request) and :func:`admitted`
(which requests of a queue a policy admits).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from labs_lib.inference.generate import Decoding, _check_length, ends_with_any, process_logits
from labs_lib.inference.paged import PagedKVCache, blocks_needed, forward_paged
from labs_lib.models.gpt import GPT

__all__ = ["POLICIES", "TooLargeForPool", "Sequence", "StepStats", "InflightBatcher", "admission_cost", "admitted"]

POLICIES = ("guaranteed_no_evict", "max_utilization")


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"batch_scheduler_policy={policy!r}: use one of {POLICIES}")


def admission_cost(policy: str, tokens: int, max_new_tokens: int, block_size: int) -> int:
    """The free blocks a request of ``tokens`` tokens to feed (its prompt) and ``max_new_tokens`` still to make
    must find to be admitted: all it will ever hold (guaranteed_no_evict), or its tokens' blocks now
    (max_utilization)."""
    _check_policy(policy)
    if policy == "guaranteed_no_evict":
        return blocks_needed(tokens, max_new_tokens, block_size)
    return -(-tokens // block_size)


def admitted(policy: str, queue: list[tuple[int, int]], free_blocks: int, block_size: int) -> list[int]:
    """Indices of the requests of ``queue`` ((prompt tokens, max new tokens), oldest first) that ``policy`` admits
    at once into ``free_blocks`` free blocks: in order while each one's cost fits what the earlier ones left."""
    taken = []
    for i, (tokens, max_new) in enumerate(queue):
        cost = admission_cost(policy, tokens, max_new, block_size)
        if cost > free_blocks:
            break
        free_blocks -= cost
        taken.append(i)
    return taken


class TooLargeForPool(ValueError):
    """A request that needs more KV blocks than the whole pool has: it could never run."""


@dataclass(eq=False)
class Sequence:
    """One request's state: its tokens so far (prompt + generated), how many of them the cache holds, its sampler."""

    id: int
    prompt: list[int]
    decoding: Decoding
    stop: tuple[tuple[int, ...], ...]
    on_token: Callable[[Sequence], None] | None
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the pool (0 again after an eviction)
    finish_reason: str | None = None  # "end_id", "stop" or "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def pending(self) -> list[int]:
        """The tokens still to feed: the whole prompt at first (or after an eviction), then the last new token."""
        return (self.prompt + self.generated)[self.cached:]

    @property
    def remaining(self) -> int:
        return self.decoding.max_new_tokens - len(self.generated)


@dataclass
class StepStats:
    """What one step did: tokens fed (prefill + decode), sequences in its pack, the queue, the pool after it."""

    step: int
    tokens: int
    prefill_tokens: int
    decode_tokens: int
    sequences: int
    running: int
    waiting: int
    blocks_in_use: int
    kv_bytes: int
    admitted: list[int]
    evicted: list[int]
    finished: list[int]


class InflightBatcher:
    """Continuous batching of ``model`` (the single-device GPT, eval mode) over a pool of ``num_blocks`` KV blocks
    of ``block_size`` tokens; see the module docstring for the step and the policies."""

    def __init__(self, model: GPT, num_blocks: int, block_size: int = 16, policy: str = "max_utilization",
                 max_num_tokens: int = 256, max_batch_size: int | None = None):
        _check_policy(policy)
        if max_num_tokens < 1 or (max_batch_size is not None and max_batch_size < 1):
            raise ValueError(f"max_num_tokens={max_num_tokens}, max_batch_size={max_batch_size}: a step needs room "
                             "for at least one token of one sequence")
        self.model, self.policy = model, policy
        self.max_num_tokens, self.max_batch_size = max_num_tokens, max_batch_size
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the newest last (the one evicted first)
        self.done: dict[int, Sequence] = {}
        self.history: list[StepStats] = []
        self._ids = 0

    def submit(self, prompt: list[int], decoding: Decoding, stop: tuple[tuple[int, ...], ...] = (),
               on_token: Callable[[Sequence], None] | None = None) -> Sequence:
        """Queue a request; it joins the running batch at a later step. Settings, lengths and a request larger
        than the whole pool are refused at once (ValueError naming the fix)."""
        decoding.check(self.model.config.vocab_size)
        if decoding.num_beams > 1:
            raise ValueError(f"num_beams={decoding.num_beams}: in-flight batching samples or decodes greedily; run "
                             "beam search with labs_lib.inference.generate.beam_search")
        if not prompt:
            raise ValueError("the prompt is empty: encode a non-empty prompt")
        _check_length(self.model, len(prompt), decoding.max_new_tokens)
        need, pool = blocks_needed(len(prompt), decoding.max_new_tokens, self.cache.block_size), self.cache.num_blocks
        if need > pool:
            raise TooLargeForPool(f"this request ({len(prompt)} prompt + {decoding.max_new_tokens} new tokens) needs "
                                  f"up to {need} KV blocks of {self.cache.block_size} tokens and the whole pool has "
                                  f"{pool}: make the pool bigger (num_blocks >= {need}) or ask for fewer new tokens")
        device = self.model.ln_f.weight.device
        seq = Sequence(self._ids, list(prompt), decoding, tuple(tuple(s) for s in stop), on_token,
                       torch.Generator(device=device).manual_seed(decoding.seed))
        self._ids += 1
        self.waiting.append(seq)
        return seq

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def run_until_done(self) -> dict[int, list[int]]:
        """Step until every submitted request has finished; each one's new tokens, by request id."""
        while not self.idle:
            self.step()
        return {i: seq.generated for i, seq in sorted(self.done.items())}

    # ------------------------------------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> StepStats | None:
        """One packed forward of the running batch (after admitting and, under max_utilization, evicting); None
        when there is nothing to run."""
        plan = self._plan_running()
        evicted = self._evict_until_it_fits(plan)
        admitted_now = [] if evicted else self._admit(plan)  # an eviction means the pool is full: admit nobody
        if not plan:
            return None
        pack = [(seq.id, seq.pending[:n]) for seq, n in plan.items()]
        logits = forward_paged(self.model, self.cache, pack, last_only=True)
        finished, decode = [], 0
        for row, (seq, n) in enumerate(plan.items()):
            decode += len(seq.pending) == 1 and bool(seq.generated)  # its newest token, not a prompt's
            seq.cached += n
            if not seq.pending:  # its last fed token was the newest: the next token comes from this row
                self._append(seq, self._next_token(seq, logits[row]))
                if seq.finished:
                    finished.append(seq.id)
        stats = StepStats(len(self.history), sum(plan.values()), sum(plan.values()) - decode, decode, len(plan),
                          len(self.running), len(self.waiting), self.cache.blocks_in_use, self.cache.nbytes_in_use,
                          admitted_now, evicted, finished)
        self.history.append(stats)
        return stats

    def _plan_running(self) -> dict[Sequence, int]:
        """Tokens each running sequence feeds this step: decoding ones first, then prefill chunks, oldest first,
        within max_num_tokens."""
        plan: dict[Sequence, int] = {}
        budget = self.max_num_tokens
        for seq in sorted(self.running, key=lambda s: len(s.pending) > 1):  # stable: oldest first within each
            take = min(len(seq.pending), budget)
            if take:
                plan[seq] = take
                budget -= take
        return plan

    def _growth(self, plan: dict[Sequence, int]) -> int:
        return sum(self.cache.growth(seq.id, n) for seq, n in plan.items())

    def _evict_until_it_fits(self, plan: dict[Sequence, int]) -> list[int]:
        """max_utilization: evict the newest running sequences until this step's new blocks are free."""
        evicted = []
        while self._growth(plan) > len(self.cache.free_blocks) and self.policy == "max_utilization":
            victim = self.running.pop()
            self.cache.free(victim.id)
            victim.cached = 0  # it resumes by recomputing its prompt and the tokens it made
            plan.pop(victim, None)
            self.waiting.appendleft(victim)
            evicted.append(victim.id)
        return evicted

    def _available_blocks(self, plan: dict[Sequence, int]) -> int:
        """Free blocks a new request may take: less this step's growth (max_utilization), or less everything the
        running sequences may still grow to (guaranteed_no_evict)."""
        if self.policy == "max_utilization":
            return len(self.cache.free_blocks) - self._growth(plan)
        bs = self.cache.block_size
        promised = sum(blocks_needed(len(s.prompt), s.decoding.max_new_tokens, bs) - self.cache.held(s.id)
                       for s in self.running)
        return len(self.cache.free_blocks) - promised

    def _admit(self, plan: dict[Sequence, int]) -> list[int]:
        """Move queued requests into the running batch (and this step's plan) as the policy, the token budget and
        max_batch_size allow."""
        budget = self.max_num_tokens - sum(plan.values())
        seats = (self.max_batch_size or len(self.running) + len(self.waiting)) - len(self.running)
        queue = [(len(seq.pending), seq.remaining) for seq in self.waiting]
        chosen = admitted(self.policy, queue, self._available_blocks(plan), self.cache.block_size)
        ids = []
        for _ in chosen[:max(0, min(seats, budget))]:  # each admitted request feeds at least one token
            seq = self.waiting.popleft()
            plan[seq] = min(len(seq.pending), budget)
            budget -= plan[seq]
            self.running.append(seq)
            ids.append(seq.id)
            if not budget:
                break
        return ids

    def _next_token(self, seq: Sequence, logits: torch.Tensor) -> int:
        """The request's own processing and sampling, as generate_ids does for its prompt alone."""
        seen = torch.tensor([seq.prompt + seq.generated], device=logits.device)
        scores = process_logits(logits[None].float(), seen, torch.ones_like(seen, dtype=torch.bool), seq.decoding)
        if seq.decoding.temperature == 0:
            return int(scores.argmax(dim=-1))
        return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=seq.generator))

    def _append(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        if token == seq.decoding.eos_token_id:
            seq.finish_reason = "end_id"
        elif ends_with_any(seq.generated, seq.stop):
            seq.finish_reason = "stop"
        elif not seq.remaining:
            seq.finish_reason = "length"
        if seq.finished:
            self.running.remove(seq)
            self.cache.free(seq.id)
            self.done[seq.id] = seq
        if seq.on_token is not None:
            seq.on_token(seq)
