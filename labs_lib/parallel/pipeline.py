"""Pipeline parallelism by hand: cut the GPT into stages, run GPipe or (interleaved) 1F1B over point-to-point messages.

    stage = partition_gpt(GPT(cfg), pp_rank=rank, pp_size=world)   # this rank's blocks (+ embeddings or head)
    schedule = OneFOneB(stage, micro_batches=8)                       # or GPipe(stage, 8)
    loss = schedule.step(idx, targets)   # forward + backward of every micro-batch: the full batch's gradients
    optimizer.step()                     # an optimizer over stage.parameters(): each rank updates its own stage
    schedule.idle_fraction()             # the bubble this rank measured during that step

    chunks = [partition_gpt(model, rank, world, chunk=c, chunks=2) for c in range(2)]   # interleaved, v = 2
    schedule = Interleaved1F1B(chunks, micro_batches=8)

Stage r holds blocks [r·L/p, (r+1)·L/p); the first stage also the embeddings, the last ln_f and lm_head. Activations
travel forward with ``dist.isend``/``irecv``, their gradients travel back the same way. The token embedding is tied
to lm_head, so the first and the last stage each hold a copy of that matrix: after backward their gradients are
summed over a group of just those two stages (Megatron's embedding group), and both copies take the same step.

Cut from a tensor-parallel GPT (``apply_tensor_parallel``), a stage holds its TP shard of those layers and the
messages go between the ranks of the same TP index (the pipeline group). With sequence parallelism the hidden
states between blocks are split along the sequence (Korthikanti et al. 2022): the first stage's embeddings
reduce-scatter them, the last stage's lm_head all-gathers them, and stages exchange (b, T/t, C) shards, 1/t of the
bytes (:meth:`GPTStage.hidden_shape`). The replicated LayerNorm and position weights get their TP all-reduce in
their own backward, so nothing changes at the end of the step.

Schedules, for p stages, m micro-batches, forward time t_f and backward time t_b per micro-batch and stage:

    GPipe  all m forwards, then all m backwards. Every stage keeps the activations of all m micro-batches.
    1F1B   min(p − r − 1, m) warm-up forwards, then one forward / one backward in turn, then the last backwards.
           Same bubble as GPipe, but stage r keeps at most p − r micro-batches alive instead of m.
    Interleaved 1F1B  each rank holds v chunks of L/(p·v) layers (rank r: virtual stages r, r + p, …), so a
           micro-batch visits every rank v times; the 1F1B order runs over (chunk, micro-batch) pairs (Megatron-LM).
           The bubble shrinks v times, at the price of v times more messages.

GPipe and 1F1B take (m + p − 1)(t_f + t_b) per step, of which each stage computes m(t_f + t_b): the bubble is
(p − 1)/(m + p − 1) of the step time (the GPipe paper's convention; Megatron-LM divides by the ideal time m(t_f + t_b)
instead and writes (p − 1)/m). Interleaving makes it (p − 1)/(v·m + p − 1). See :func:`bubble_fraction`.

Loss convention: each micro-batch's mean loss is divided by m before its backward, so the gradients add up to the
full-batch mean gradient. ``torch.distributed.pipelining`` gets the same gradients by dividing them by m
afterwards (``scale_grads=True``).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from labs_lib.core.config import divisors
from labs_lib.measure.memory import ActivationMeter
from labs_lib.models.gpt import GPT
from labs_lib.parallel.comms import group_size

__all__ = ["SCHEDULES", "check_pipeline", "GPTStage", "partition_gpt", "gpt_loss", "Event",
           "PipelineSchedule", "GPipe", "OneFOneB", "Interleaved1F1B", "make_schedule"]

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


def check_pipeline(n_layer: int, pp: int, batch_size: int, micro_batches: int, schedule: str = "1f1b",
                   chunks: int = 1) -> None:
    """Raise ``ValueError`` naming the fix for a pipeline layout that cannot run. Call it before spawning ranks.

    ``chunks``: model chunks per rank (v), for the interleaved schedule only."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: use --schedule with one of {', '.join(SCHEDULES)}")
    if pp < 1 or micro_batches < 1 or chunks < 1:
        raise ValueError(f"pp, micro_batches and chunks must be >= 1, got pp={pp} micro_batches={micro_batches} "
                         f"chunks={chunks}")
    if schedule == "interleaved-1f1b":
        if pp < 2 or chunks < 2:
            raise ValueError(f"interleaved 1F1B needs pp >= 2 and chunks >= 2, got pp={pp} chunks={chunks}: raise "
                             "them or use --schedule 1f1b")
        if micro_batches % pp:
            raise ValueError(f"interleaved 1F1B runs micro-batches in groups of pp={pp}, got micro_batches="
                             f"{micro_batches}: use a multiple of {pp} or --schedule 1f1b")
    elif chunks != 1:
        raise ValueError(f"only the interleaved schedule runs several chunks per rank, got chunks={chunks} with "
                         f"{schedule}: use --schedule interleaved-1f1b or chunks=1")
    if n_layer % (pp * chunks):
        what = "pp" if chunks == 1 else f"pp*chunks={pp * chunks}"
        raise ValueError(f"n_layer={n_layer} is not divisible by {what}: choose pp among the divisors of n_layer "
                         f"{divisors(n_layer)}" + ("" if chunks == 1 else " and chunks so that pp*chunks divides it"))
    if batch_size % micro_batches:
        raise ValueError(f"batch size {batch_size} is not divisible by micro_batches={micro_batches}: choose "
                         f"--micro-batches among the divisors of the batch size {divisors(batch_size)}")
    if schedule == "1f1b" and micro_batches < pp:
        raise ValueError(f"1F1B needs at least as many micro-batches as stages, got micro_batches={micro_batches} < "
                         f"pp={pp}: raise --micro-batches to at least {pp} or use --schedule gpipe")


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The GPT's loss (mean cross-entropy over tokens, -100 ignored), as a function of the last stage's output."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


class GPTStage(nn.Module):
    """One pipeline stage of a :class:`GPT`, sharing the model's modules (and so its parameters and their names).

    ``forward`` maps token ids (first stage) or hidden states (other stages) to hidden states, or to logits on the
    last stage: exactly the ops of ``GPT.forward``, cut at block boundaries. With ``chunks`` = v > 1 (interleaved
    schedule) rank r holds v stages, ``chunk`` c being virtual stage ``c·p + r`` of p·v."""

    def __init__(self, model: GPT, pp_rank: int, pp_size: int, group: dist.ProcessGroup | None = None,
                 chunk: int = 0, chunks: int = 1):
        super().__init__()
        n_layer, num_stages = model.config.n_layer, pp_size * chunks
        if n_layer % num_stages:
            what = "pp" if chunks == 1 else f"pp*chunks={num_stages}"
            raise ValueError(f"n_layer={n_layer} is not divisible by {what}: choose pp among the divisors of "
                             f"n_layer {divisors(n_layer)}")
        if not (0 <= pp_rank < pp_size and 0 <= chunk < chunks):
            raise ValueError(f"pp_rank={pp_rank}, chunk={chunk} is outside a pipeline of {pp_size} ranks x {chunks} "
                             "chunks")
        self.config = model.config
        self.pp_rank, self.pp_size, self.group, self.chunk = pp_rank, pp_size, group, chunk
        self.stage_index = chunk * pp_size + pp_rank  # position in the pipeline of p·v virtual stages
        self.is_first, self.is_last = self.stage_index == 0, self.stage_index == num_stages - 1
        # Global ranks of the stages, in pipeline order: point-to-point calls address global ranks.
        self.ranks = list(range(pp_size))
        if pp_size > 1:
            if not dist.is_initialized():
                raise RuntimeError("a pipeline of more than one stage needs torch.distributed: call "
                                   "labs_lib.core.dist.init_distributed() (under torchrun or Slurm) first")
            self.ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
            if len(self.ranks) != pp_size:
                raise ValueError(f"the pipeline group has {len(self.ranks)} ranks but pp={pp_size}: launch pp "
                                 "processes per pipeline or pass the pipeline's process group")

        per_stage, first_layer = n_layer // num_stages, self.stage_index * n_layer // num_stages
        if self.is_first:
            self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop
        # A ModuleDict keyed by the global layer index keeps the parameter names of the full model (blocks.5.…).
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(first_layer, first_layer + per_stage)})
        if self.is_last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head
        # Sequence parallelism (a tensor-parallel GPT's flag) splits the hidden states between stages t ways.
        self.sequence_shards = group_size(model.tp_group) if getattr(model, "sequence_parallel", False) else 1

        # With one stage the tied matrix is one parameter; with several, the first and last stage hold a copy each.
        self.tied_group = None
        if pp_size > 1 and (self.is_first or self.is_last):
            self.tied_group = dist.new_group([self.ranks[0], self.ranks[-1]], use_local_synchronization=True)

    # The neighbouring virtual stages live on the neighbouring ranks (around the ring when interleaved).
    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def next_rank(self) -> int:
        return self.ranks[(self.pp_rank + 1) % self.pp_size]

    def hidden_shape(self, batch_size: int, seq_len: int) -> tuple[int, int, int]:
        """The shape of the hidden states this stage receives and sends for a (batch_size, seq_len) batch."""
        return batch_size, seq_len // self.sequence_shards, self.config.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            pos = torch.arange(x.size(1), device=x.device)
            x = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        for block in self.blocks.values():
            x = block(x)
        if self.is_last:
            x = self.lm_head(self.ln_f(x))
        return x

    def sync_tied_grads(self) -> None:
        """Sum the embedding / lm_head gradient of the first and the last stage, so both copies get the full one."""
        if self.tied_group is None:
            return
        weight = self.tok_emb.weight if self.is_first else self.lm_head.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=self.tied_group)


def partition_gpt(model: GPT, pp_rank: int, pp_size: int, group: dist.ProcessGroup | None = None,
                  chunk: int = 0, chunks: int = 1) -> GPTStage:
    """Stage ``pp_rank`` of ``pp_size`` of ``model`` (``n_layer`` must divide evenly); with ``chunks`` > 1, its
    ``chunk``-th model chunk for the interleaved schedule (build all of a rank's chunks, in order).

    ``group``: the pipeline's process group (None: the whole world is one pipeline). The stage shares modules with
    ``model``: drop the model afterwards to free the other stages' layers. Every rank of the pipeline calls this."""
    return GPTStage(model, pp_rank, pp_size, group, chunk, chunks)


class Event(NamedTuple):
    """One span of a rank's timeline (``time.perf_counter`` seconds)."""

    kind: str  # forward | backward | send | recv | idle
    micro_batch: int | None  # None for the end-of-step communication
    start: float
    end: float


class PipelineSchedule(ABC):
    """Runs one training step of a rank's stage(s) over ``micro_batches`` micro-batches; subclasses choose the order.

    Timeline of the last step, per rank, in ``self.timeline``:
        forward / backward  the stage's compute for one micro-batch (including ``compute_delay_s``)
        recv                waiting for a micro-batch's activation or gradient from the neighbouring stage
        send                posting sends; at the end of the step, finishing them and all-reducing the tied gradient
        idle                the end of the step: waiting for the slowest stage (loss broadcast and a barrier)
    The step starts after a barrier, so every rank's step window is the same wall-clock span.

    ``measure`` (default True, the lab's job): those two barriers, and :class:`ActivationMeter` around every
    forward. Training (:class:`~labs_lib.parallel.parallel3d.Parallel3D`) passes False: the hooks cost Python on every
    saved tensor and the barriers a round of messages, for numbers nobody reads; ``peak_activation_bytes`` stays 0
    and a rank's step window starts when it enters the step. The timeline and ``peak_in_flight`` are always kept.

    ``compute_delay_s`` (tests and benchmarks only): sleep that long after every forward of a stage module and twice
    that after every backward, as if its compute took that much longer. On a small CPU the real compute of a tiny
    model is shorter than the noise of several processes sharing two cores; the delay makes balanced stages whose
    compute dominates, so the measured bubble can be compared with (p − 1)/(m + p − 1).

    Memory: ``peak_in_flight`` micro-batches (per chunk) whose activations were kept for backward at once, and
    ``peak_activation_bytes`` those activations' bytes (:class:`ActivationMeter` around each forward).

    Every receive is posted one message ahead (the next micro-batch's, per chunk and direction, as soon as the
    previous one arrived): gloo transmits a send only once the receiver has posted its receive, so a receive posted
    at the moment it is needed would put a round trip between the two processes on the critical path.
    """

    name = ""

    def __init__(self, stages: GPTStage | list[GPTStage], micro_batches: int, loss_fn=gpt_loss,
                 compute_delay_s: float = 0.0, measure: bool = True, broadcast_loss: bool = True):
        self.stages = [stages] if isinstance(stages, GPTStage) else list(stages)
        if [s.chunk for s in self.stages] != list(range(len(self.stages))):
            raise ValueError("pass one stage per model chunk of this rank, in chunk order (chunk=0, 1, …)")
        self.first = self.stages[0]  # every chunk shares the rank's place in the pipeline
        self.micro_batches, self.loss_fn, self.compute_delay_s = micro_batches, loss_fn, compute_delay_s
        self._check(batch_size=micro_batches)  # everything but the batch size, which step() checks
        self.measure, self.broadcast_loss = measure, broadcast_loss
        self.meter = ActivationMeter(nn.ModuleList(self.stages)) if measure else None
        self.timeline: list[Event] = []
        self.step_start = self.step_end = 0.0
        self.peak_in_flight = self.peak_activation_bytes = 0

    def _check(self, batch_size: int) -> None:
        check_pipeline(self.first.config.n_layer, self.first.pp_size, batch_size, self.micro_batches, self.name,
                       len(self.stages))

    @abstractmethod
    def _run(self) -> None:
        """Run this step's forwards and backwards in the schedule's order (GPipe, 1F1B, interleaved)."""

    def step(self, idx: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward of the batch ``idx`` → ``targets`` (B, T), in micro-batches; gradients accumulate in
        the stage's parameters (zero them between steps). Every stage passes the same batch: the first reads the
        tokens, the last the targets, the others their shape. Returns the batch's mean loss on every rank (built with
        ``broadcast_loss=False``: on the last stage, 0 on the others, one collective fewer per step)."""
        self._check(batch_size=idx.size(0))
        m = self.micro_batches
        self._tokens, self._targets = idx.chunk(m), targets.chunk(m)
        self._hidden_shape = self.first.hidden_shape(idx.size(0) // m, idx.size(1))
        self._dtype = next(self.first.parameters()).dtype
        self._saved: dict[tuple[int, int], tuple] = {}  # (chunk, micro-batch) → (input, output or loss, bytes)
        self._live_bytes, self._pending_sends = 0, []
        self._loss = torch.zeros((), dtype=torch.float32, device=idx.device)
        self.timeline, self.peak_in_flight, self.peak_activation_bytes = [], 0, 0

        distributed = self.first.pp_size > 1
        group = self.first.group
        if distributed and self.measure:
            dist.barrier(group=group)
        self.step_start = time.perf_counter()
        self._posted_recvs: dict[tuple[int, bool], tuple[int, dist.Work, torch.Tensor]] = {}
        for stage in self.stages:  # every (chunk, direction) receives micro-batches 0, 1, … in that order
            if not stage.is_first:
                self._post_recv(stage, is_grad=False, micro_batch=0)
            if not stage.is_last:
                self._post_recv(stage, is_grad=True, micro_batch=0)
        self._run()
        if distributed:
            start = time.perf_counter()
            for work, _ in self._pending_sends:
                work.wait()
            self._pending_sends = []
            for stage in self.stages:
                stage.sync_tied_grads()
            self._record("send", None, start)
            start = time.perf_counter()
            if self.broadcast_loss:
                dist.broadcast(self._loss, src=self.first.ranks[-1], group=group)
            if self.measure:
                dist.barrier(group=group)
            self._record("idle", None, start)
        self.step_end = time.perf_counter()
        return self._loss.item()

    def idle_fraction(self) -> float:
        """Share of the last step's time this rank did not compute: 1 − (forward + backward time) / step time."""
        if not self.timeline:
            raise RuntimeError("no step has run yet: call step() first")
        busy = sum(e.end - e.start for e in self.timeline if e.kind in ("forward", "backward"))
        return 1 - busy / (self.step_end - self.step_start)

    # -- building blocks of the schedules ------------------------------------------------------------------------

    def _record(self, kind: str, micro_batch: int | None, start: float) -> None:
        self.timeline.append(Event(kind, micro_batch, start, time.perf_counter()))

    def _tag(self, receiver: int, is_grad: bool, micro_batch: int) -> int:
        """A message's tag, unique per (receiving virtual stage, direction, micro-batch): with interleaving, one pair
        of ranks carries several chunks' activations and gradients, in both directions."""
        return (2 * receiver + is_grad) * self.micro_batches + micro_batch

    def _post_recv(self, stage: GPTStage, is_grad: bool, micro_batch: int) -> None:
        src = stage.next_rank if is_grad else stage.prev_rank
        buffer = torch.empty(self._hidden_shape, dtype=self._dtype, device=self._loss.device)
        work = dist.irecv(buffer, src, tag=self._tag(stage.stage_index, is_grad, micro_batch))
        self._posted_recvs[stage.chunk, is_grad] = micro_batch, work, buffer

    def _recv(self, stage: GPTStage, is_grad: bool, micro_batch: int) -> torch.Tensor:
        """Micro-batch ``micro_batch``'s activation (or, ``is_grad``, its output's gradient) for ``stage``; posts the
        receive of the next one."""
        start = time.perf_counter()
        posted, work, buffer = self._posted_recvs.pop((stage.chunk, is_grad))
        assert posted == micro_batch, f"schedule received micro-batch {micro_batch} before {posted}"
        work.wait()
        if micro_batch + 1 < self.micro_batches:
            self._post_recv(stage, is_grad, micro_batch + 1)
        self._record("recv", micro_batch, start)
        return buffer.requires_grad_(not is_grad)

    def _send(self, tensor: torch.Tensor, dst: int, tag: int, micro_batch: int) -> None:
        # Sends never block the schedule: a rank only waits for what it receives, so no order of sends can deadlock.
        start = time.perf_counter()
        tensor = tensor.detach().contiguous()
        self._pending_sends = [(w, t) for w, t in self._pending_sends if not w.is_completed()]
        self._pending_sends.append((dist.isend(tensor, dst, tag=tag), tensor))  # keep the buffer until it is sent
        self._record("send", micro_batch, start)

    def _forward(self, i: int, chunk: int = 0) -> None:
        stage = self.stages[chunk]
        x = self._tokens[i] if stage.is_first else self._recv(stage, is_grad=False, micro_batch=i)
        start = time.perf_counter()
        with self.meter or contextlib.nullcontext():
            y = stage(x)
            if stage.is_last:
                y = self.loss_fn(y, self._targets[i]) / self.micro_batches
        if self.compute_delay_s:  # even sleep(0) would hand the core to another process
            time.sleep(self.compute_delay_s)
        self._record("forward", i, start)
        nbytes = self.meter.bytes if self.meter else 0
        self._saved[chunk, i] = (x, y, nbytes)
        self._live_bytes += nbytes
        self.peak_in_flight = max(self.peak_in_flight, len(self._saved))
        self.peak_activation_bytes = max(self.peak_activation_bytes, self._live_bytes)
        if stage.is_last:
            self._loss += y.detach().float()
        else:
            self._send(y, stage.next_rank, self._tag(stage.stage_index + 1, False, i), i)

    def _backward(self, i: int, chunk: int = 0) -> None:
        stage = self.stages[chunk]
        grad_y = None if stage.is_last else self._recv(stage, is_grad=True, micro_batch=i)
        x, y, nbytes = self._saved.pop((chunk, i))
        start = time.perf_counter()
        torch.autograd.backward(y, grad_y)  # on the last stage y is the loss already scaled by 1/m
        if self.compute_delay_s:
            time.sleep(2 * self.compute_delay_s)  # backward costs about twice the forward
        self._record("backward", i, start)
        self._live_bytes -= nbytes
        if not stage.is_first:
            self._send(x.grad, stage.prev_rank, self._tag(stage.stage_index - 1, True, i), i)


class GPipe(PipelineSchedule):
    """All forwards, then all backwards (Huang et al. 2019): simple, but keeps all m micro-batches' activations."""

    name = "gpipe"

    def _run(self) -> None:
        for i in range(self.micro_batches):
            self._forward(i)
        for i in range(self.micro_batches):
            self._backward(i)


class OneFOneB(PipelineSchedule):
    """PipeDream-flush / Megatron 1F1B (Narayanan et al. 2021): a backward as soon as its gradient can arrive."""

    name = "1f1b"

    def _run(self) -> None:
        m = self.micro_batches
        warmup = min(self.first.pp_size - self.first.pp_rank - 1, m)
        for i in range(warmup):
            self._forward(i)
        for i in range(m - warmup):  # steady state: micro-batch warmup + i goes forward, micro-batch i backward
            self._forward(warmup + i)
            self._backward(i)
        for i in range(m - warmup, m):  # cool-down
            self._backward(i)


class Interleaved1F1B(PipelineSchedule):
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021, section 2.2): 1F1B over v chunks per rank.

    Work unit k (of m·v) is micro-batch ``(k // (p·v))·p + k % p`` on chunk ``(k // p) % v`` (reversed for
    backward): groups of p micro-batches go through chunk 0, then chunk 1, … The longer warm-up,
    2(p − r − 1) + (v − 1)·p units, fills all chunks before the first backward can come back."""

    name = "interleaved-1f1b"

    def _unit(self, k: int, forward: bool) -> tuple[int, int]:
        p, v = self.first.pp_size, len(self.stages)
        chunk = (k // p) % v
        return (k // (p * v)) * p + k % p, chunk if forward else v - 1 - chunk

    def _run(self) -> None:
        p, r, v = self.first.pp_size, self.first.pp_rank, len(self.stages)
        units = self.micro_batches * v
        warmup = min(2 * (p - r - 1) + (v - 1) * p, units)
        for k in range(warmup):
            self._forward(*self._unit(k, forward=True))
        for k in range(units - warmup):
            self._forward(*self._unit(warmup + k, forward=True))
            self._backward(*self._unit(k, forward=False))
        for k in range(units - warmup, units):
            self._backward(*self._unit(k, forward=False))


def make_schedule(name: str, stages: GPTStage | list[GPTStage], micro_batches: int, **kwargs) -> PipelineSchedule:
    """The schedule called ``name`` (one of :data:`SCHEDULES`), e.g. from a ``--schedule`` flag."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}: use --schedule with one of {', '.join(SCHEDULES)}")
    return {"gpipe": GPipe, "1f1b": OneFOneB, "interleaved-1f1b": Interleaved1F1B}[name](stages, micro_batches,
                                                                                         **kwargs)
