"""Pipeline parallelism by hand: cut the GPT into stages and run GPipe or 1F1B over point-to-point messages.

    stage = partition_gpt(GPT(cfg), pp_rank=rank, pp_size=world)   # this rank's blocks (+ embeddings or head)
    schedule = OneFOneB(stage, micro_batches=8)                       # or GPipe(stage, 8)
    loss = schedule.step(idx, targets)   # forward + backward of every micro-batch: the full batch's gradients
    optimizer.step()                     # an optimizer over stage.parameters(): each rank updates its own stage
    schedule.idle_fraction()             # the bubble this rank measured during that step

Stage r holds blocks [r·L/p, (r+1)·L/p); the first stage also the embeddings, the last ln_f and lm_head. Activations
travel forward with ``dist.isend``/``irecv``, their gradients travel back the same way. The token embedding is tied
to lm_head, so the first and the last stage each hold a copy of that matrix: after backward their gradients are
summed over a group of just those two stages (Megatron's embedding group), and both copies take the same step.

Schedules, for p stages, m micro-batches, forward time t_f and backward time t_b per micro-batch and stage:

    GPipe  all m forwards, then all m backwards. Every stage keeps the activations of all m micro-batches.
    1F1B   min(p − r − 1, m) warm-up forwards, then one forward / one backward in turn, then the last backwards.
           Same bubble as GPipe, but stage r keeps at most p − r micro-batches alive instead of m.

Both take (m + p − 1)(t_f + t_b) per step, of which each stage computes m(t_f + t_b): the bubble is
(p − 1)/(m + p − 1) of the step time (the GPipe paper's convention; Megatron-LM divides by the ideal time m(t_f + t_b)
instead and writes (p − 1)/m). See :func:`bubble_fraction`.

Loss convention: each micro-batch's mean loss is divided by m before its backward, so the gradients add up to the
full-batch mean gradient. ``torch.distributed.pipelining`` gets the same gradients by dividing them by m
afterwards (``scale_grads=True``).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from labs_lib.model import GPT
from labs_lib.profiling import ActivationMeter

__all__ = ["SCHEDULES", "check_pipeline", "bubble_fraction", "GPTStage", "partition_gpt", "gpt_loss", "Event",
           "PipelineSchedule", "GPipe", "OneFOneB", "make_schedule"]

SCHEDULES = ("gpipe", "1f1b")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_pipeline(n_layer: int, pp: int, batch_size: int, micro_batches: int, schedule: str = "1f1b") -> None:
    """Raise ``ValueError`` naming the fix for a pipeline layout that cannot run. Call it before spawning ranks."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: use --schedule with one of {', '.join(SCHEDULES)}")
    if pp < 1 or micro_batches < 1:
        raise ValueError(f"pp and micro_batches must be >= 1, got pp={pp} micro_batches={micro_batches}")
    if n_layer % pp:
        raise ValueError(f"n_layer={n_layer} is not divisible by pp={pp}: choose pp among the divisors of n_layer "
                         f"{_divisors(n_layer)}")
    if batch_size % micro_batches:
        raise ValueError(f"batch size {batch_size} is not divisible by micro_batches={micro_batches}: choose "
                         f"--micro-batches among the divisors of the batch size {_divisors(batch_size)}")
    if schedule == "1f1b" and micro_batches < pp:
        raise ValueError(f"1F1B needs at least as many micro-batches as stages, got micro_batches={micro_batches} < "
                         f"pp={pp}: raise --micro-batches to at least {pp} or use --schedule gpipe")


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle share of a GPipe / 1F1B step with balanced stages: (p − 1)/(m + p − 1) of the total time."""
    return (pp - 1) / (micro_batches + pp - 1)


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The GPT's loss (mean cross-entropy over tokens, -100 ignored), as a function of the last stage's output."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


class GPTStage(nn.Module):
    """One pipeline stage of a :class:`GPT`, sharing the model's modules (and so its parameters and their names).

    ``forward`` maps token ids (first stage) or hidden states (other stages) to hidden states, or to logits on the
    last stage: exactly the ops of ``GPT.forward``, cut at block boundaries."""

    def __init__(self, model: GPT, pp_rank: int, pp_size: int, group: dist.ProcessGroup | None = None):
        super().__init__()
        n_layer = model.config.n_layer
        if n_layer % pp_size:
            raise ValueError(f"n_layer={n_layer} is not divisible by pp={pp_size}: choose pp among the divisors of "
                             f"n_layer {_divisors(n_layer)}")
        if not 0 <= pp_rank < pp_size:
            raise ValueError(f"pp_rank={pp_rank} is outside the pipeline of {pp_size} stages")
        self.config = model.config
        self.pp_rank, self.pp_size, self.group = pp_rank, pp_size, group
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp_size - 1
        # Global ranks of the stages, in pipeline order: point-to-point calls address global ranks.
        self.ranks = list(range(pp_size))
        if pp_size > 1:
            if not dist.is_initialized():
                raise RuntimeError("a pipeline of more than one stage needs torch.distributed: call "
                                   "labs_lib.dist.init_distributed() (under torchrun or Slurm) first")
            self.ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
            if len(self.ranks) != pp_size:
                raise ValueError(f"the pipeline group has {len(self.ranks)} ranks but pp={pp_size}: launch pp "
                                 "processes per pipeline or pass the pipeline's process group")

        per_stage = n_layer // pp_size
        if self.is_first:
            self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop
        # A ModuleDict keyed by the global layer index keeps the parameter names of the full model (blocks.5.…).
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(pp_rank * per_stage,
                                                                             (pp_rank + 1) * per_stage)})
        if self.is_last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head

        # With one stage the tied matrix is one parameter; with several, the first and last stage hold a copy each.
        self.tied_group = None
        if pp_size > 1 and (self.is_first or self.is_last):
            self.tied_group = dist.new_group([self.ranks[0], self.ranks[-1]], use_local_synchronization=True)

    @property
    def prev_rank(self) -> int:
        return self.ranks[self.pp_rank - 1]

    @property
    def next_rank(self) -> int:
        return self.ranks[self.pp_rank + 1]

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


def partition_gpt(model: GPT, pp_rank: int, pp_size: int, group: dist.ProcessGroup | None = None) -> GPTStage:
    """Stage ``pp_rank`` of ``pp_size`` of ``model`` (``n_layer`` must divide evenly).

    ``group``: the pipeline's process group (None: the whole world is one pipeline). The stage shares modules with
    ``model``: drop the model afterwards to free the other stages' layers. Every rank of the pipeline calls this."""
    return GPTStage(model, pp_rank, pp_size, group)


class Event(NamedTuple):
    """One span of a rank's timeline (``time.perf_counter`` seconds)."""

    kind: str  # forward | backward | send | recv | idle
    micro_batch: int | None  # None for the end-of-step communication
    start: float
    end: float


class PipelineSchedule:
    """Runs one training step of a stage over ``micro_batches`` micro-batches; subclasses choose the order.

    Timeline of the last step, per rank, in ``self.timeline``:
        forward / backward  the stage's compute for one micro-batch (including ``compute_delay_s``)
        recv                waiting for a micro-batch's activation or gradient from the neighbouring stage
        send                posting sends; at the end of the step, finishing them and all-reducing the tied gradient
        idle                the end of the step: waiting for the slowest stage (loss broadcast and a barrier)
    The step starts after a barrier, so every rank's step window is the same wall-clock span.

    ``compute_delay_s`` (tests and benchmarks only): sleep that long after every forward and twice that after every
    backward, as if each stage's compute took that much longer. On a small CPU the real compute of a tiny model is
    shorter than the noise of several processes sharing two cores; the delay makes balanced stages whose compute
    dominates, so the measured bubble can be compared with (p − 1)/(m + p − 1).

    Memory: ``peak_in_flight`` micro-batches whose activations were kept for backward at once, and
    ``peak_activation_bytes`` those activations' bytes (:class:`ActivationMeter` around each forward).
    """

    def __init__(self, stage: GPTStage, micro_batches: int, loss_fn=gpt_loss, compute_delay_s: float = 0.0):
        self.stage, self.micro_batches, self.loss_fn = stage, micro_batches, loss_fn
        self.compute_delay_s = compute_delay_s
        self._check(batch_size=micro_batches)  # everything but the batch size, which step() checks
        self.meter = ActivationMeter(stage)
        self.timeline: list[Event] = []
        self.step_start = self.step_end = 0.0
        self.peak_in_flight = self.peak_activation_bytes = 0

    name = ""

    def _check(self, batch_size: int) -> None:
        check_pipeline(self.stage.config.n_layer, self.stage.pp_size, batch_size, self.micro_batches, self.name)

    def _run(self) -> None:
        raise NotImplementedError

    def step(self, idx: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward of the batch ``idx`` → ``targets`` (B, T), in micro-batches; gradients accumulate in
        the stage's parameters (zero them between steps). Every stage passes the same batch: the first reads the
        tokens, the last the targets, the others their shape. Returns the batch's mean loss on every rank."""
        self._check(batch_size=idx.size(0))
        stage, m = self.stage, self.micro_batches
        self._tokens, self._targets = idx.chunk(m), targets.chunk(m)
        micro_batch_size, seq_len = idx.size(0) // m, idx.size(1)
        self._hidden_shape = (micro_batch_size, seq_len, stage.config.n_embd)
        self._dtype = next(stage.parameters()).dtype
        self._saved: dict[int, tuple] = {}  # micro-batch → (stage input, stage output or loss, activation bytes)
        self._live_bytes, self._pending_sends = 0, []
        self._loss = torch.zeros((), dtype=torch.float32, device=idx.device)
        self.timeline, self.peak_in_flight, self.peak_activation_bytes = [], 0, 0

        distributed = stage.pp_size > 1
        if distributed:
            dist.barrier(group=stage.group)
        self.step_start = time.perf_counter()
        self._run()
        if distributed:
            start = time.perf_counter()
            for work, _ in self._pending_sends:
                work.wait()
            self._pending_sends = []
            stage.sync_tied_grads()
            self._record("send", None, start)
            start = time.perf_counter()
            dist.broadcast(self._loss, src=stage.ranks[-1], group=stage.group)
            dist.barrier(group=stage.group)
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

    def _recv(self, src: int, micro_batch: int, requires_grad: bool) -> torch.Tensor:
        start = time.perf_counter()
        buffer = torch.empty(self._hidden_shape, dtype=self._dtype, device=self._loss.device)
        dist.irecv(buffer, src).wait()
        self._record("recv", micro_batch, start)
        return buffer.requires_grad_(requires_grad)

    def _send(self, tensor: torch.Tensor, dst: int, micro_batch: int) -> None:
        # Sends never block the schedule: a rank only waits for what it receives, so no order of sends can deadlock.
        start = time.perf_counter()
        tensor = tensor.detach().contiguous()
        self._pending_sends = [(w, t) for w, t in self._pending_sends if not w.is_completed()]
        self._pending_sends.append((dist.isend(tensor, dst), tensor))  # keep the buffer alive until it is sent
        self._record("send", micro_batch, start)

    def _forward(self, i: int) -> None:
        stage = self.stage
        x = self._tokens[i] if stage.is_first else self._recv(stage.prev_rank, i, requires_grad=True)
        start = time.perf_counter()
        with self.meter:
            y = stage(x)
            if stage.is_last:
                y = self.loss_fn(y, self._targets[i]) / self.micro_batches
        time.sleep(self.compute_delay_s)
        self._record("forward", i, start)
        self._saved[i] = (x, y, self.meter.bytes)
        self._live_bytes += self.meter.bytes
        self.peak_in_flight = max(self.peak_in_flight, len(self._saved))
        self.peak_activation_bytes = max(self.peak_activation_bytes, self._live_bytes)
        if stage.is_last:
            self._loss += y.detach().float()
        else:
            self._send(y, stage.next_rank, i)

    def _backward(self, i: int) -> None:
        stage = self.stage
        grad_y = None if stage.is_last else self._recv(stage.next_rank, i, requires_grad=False)
        x, y, nbytes = self._saved.pop(i)
        start = time.perf_counter()
        torch.autograd.backward(y, grad_y)  # on the last stage y is the loss already scaled by 1/m
        time.sleep(2 * self.compute_delay_s)  # backward costs about twice the forward
        self._record("backward", i, start)
        self._live_bytes -= nbytes
        if not stage.is_first:
            self._send(x.grad, stage.prev_rank, i)


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
        warmup = min(self.stage.pp_size - self.stage.pp_rank - 1, m)
        for i in range(warmup):
            self._forward(i)
        for i in range(m - warmup):  # steady state: micro-batch warmup + i goes forward, micro-batch i backward
            self._forward(warmup + i)
            self._backward(i)
        for i in range(m - warmup, m):  # cool-down
            self._backward(i)


def make_schedule(name: str, stage: GPTStage, micro_batches: int, **kwargs) -> PipelineSchedule:
    """The schedule called ``name`` (``gpipe`` or ``1f1b``), e.g. from a ``--schedule`` flag."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}: use --schedule with one of {', '.join(SCHEDULES)}")
    return {"gpipe": GPipe, "1f1b": OneFOneB}[name](stage, micro_batches, **kwargs)
