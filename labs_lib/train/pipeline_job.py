"""Pipeline-parallel training of the workshop GPT as a job: every rank writes its timeline to a file (lab 05).

    torchrun --standalone --nproc-per-node=4 -m labs_lib.train.pipeline_job --pp 4 --micro-batches 8 \\
        --schedule 1f1b --steps 3 --compute-delay-s 0.03 --n-layer 8 --profile ci --out build/runs/pp
    python -m labs_lib.train.pipeline_job --reference --steps 3 --n-layer 8 --profile ci --out build/runs/ref
    (add --impl torch to run torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B / ScheduleInterleaved1F1B
    over the same stages: the production implementation, for comparison; it writes losses, no timeline)

A notebook launches it through labs_lib.labs.lab05 (labs_lib.jobs.launch: Slurm, else torchrun) and reads its files.

Every rank builds the profile's GPT from the same seed (flags override its shape), keeps its stage(s) of
:func:`~labs_lib.parallel.pipeline.partition_gpt`, and takes ``--steps`` AdamW steps (labs_lib.train.optim; constant
learning rate, no gradient clipping) on real batches through labs_lib.train.loop.run_loop: the profile's corpus and
tokenizer (:func:`labs_lib.data.text.prepare_data`), every rank reading the same global batch from
:class:`~labs_lib.data.text.TokenBatches` (the first stage uses its tokens, the last its targets). ``--reference``
takes the same steps with the whole model in one process.

Files in ``--out``:
    metrics.jsonl          one record per step (rank 0's): step, loss, lr, tokens_per_s, step_time_s, tokens,
                           elapsed_s, and for our schedules idle_fraction, peak_in_flight, peak_activation_bytes
    pipeline_rank<r>.json  rank r's layout (layers, modules, parameters per chunk), the losses, and ``per_step``: its
                           metrics records, each with its timeline (forward / backward / send / recv / idle events,
                           seconds from the step's start). The top-level ``timeline`` / ``idle_fraction`` are those
                           of the ``shown_step``: of the steps after the first (a warm-up), the one with the least
                           idle time averaged over ranks, the same step on every rank (other processes on shared
                           cores can only add idle time).
    reference.json         ``--reference``: the losses of one process
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from labs_lib.core.config import GPTConfig, TrainConfig, get_profile, override, parse_job_args, validate
from labs_lib.core.runs import write_json
from labs_lib.estimates.parallel import bubble_fraction
from labs_lib.parallel.pipeline import SCHEDULES, check_pipeline
from labs_lib.train.cli import add_model_args, add_run_args, model_config_from_args
from labs_lib.train.loop import Loop, run_loop
from labs_lib.train.optim import make_optimizer, param_groups

__all__ = ["SCHEDULE_ALIASES", "build_parser", "check_args", "torch_schedule", "main"]

SCHEDULE_ALIASES = {"interleaved": "interleaved-1f1b"}  # --schedule interleaved is short for interleaved-1f1b


# ------------------------------------------------------------------------------------------ configuration

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.train.pipeline_job", description=__doc__.split("\n")[0])
    add_run_args(p, resume=False)
    add_model_args(p)
    p.add_argument("--pp", type=int, default=1, help="pipeline stages = processes (torchrun --nproc-per-node)")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches m per step (divides --batch-size)")
    p.add_argument("--schedule", default="1f1b", choices=[*SCHEDULES, *SCHEDULE_ALIASES])
    p.add_argument("--chunks", type=int, help="model chunks per rank v (interleaved only; default 2 there, else 1)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (the first one also warms up)")
    p.add_argument("--compute-delay-s", type=float, default=0.0,
                   help="sleep after each stage forward (twice after each backward): readable timelines on a CPU")
    p.add_argument("--reference", action="store_true", help="one process, the whole model, no pipeline")
    p.add_argument("--impl", choices=("ours", "torch"), default="ours",
                   help="our schedules (with timelines) or torch.distributed.pipelining's over the same stages")
    p.add_argument("--batch-size", type=int, help="override the profile's global batch size")
    p.add_argument("--seed", type=int, help="override the profile's seed")
    p.add_argument("--lr", type=float, help="override the profile's learning rate (constant here)")
    return p


def _configs(a: argparse.Namespace) -> tuple[GPTConfig, TrainConfig, str, int]:
    """Model and train configs, the schedule's full name and the chunks per rank; ``ValueError`` naming the fix."""
    profile = get_profile(a.profile)
    model_cfg = model_config_from_args(profile.model, a)
    train_cfg = override(profile.train, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    validate(model_cfg, train_cfg)
    schedule = SCHEDULE_ALIASES.get(a.schedule, a.schedule)
    chunks = a.chunks if a.chunks is not None else (2 if schedule == "interleaved-1f1b" else 1)
    if a.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {a.steps}")
    if a.compute_delay_s < 0:
        raise ValueError(f"--compute-delay-s must be >= 0, got {a.compute_delay_s}")
    if not a.reference:
        check_pipeline(model_cfg.n_layer, a.pp, train_cfg.batch_size, a.micro_batches, schedule, chunks)
    return model_cfg, train_cfg, schedule, chunks


def _check_world(a: argparse.Namespace, world_size: int) -> None:
    expected = 1 if a.reference else a.pp
    if world_size != expected:
        what = "--reference runs on one process" if a.reference else f"--pp {a.pp} needs one process per stage"
        raise ValueError(f"{what}, not {world_size}: launch with nproc_per_node={expected} on one node")


def check_args(argv: list[str], world_size: int) -> int:
    """Parse and check exactly what the job's ranks will see on ``world_size`` processes (``--pp`` of them, 1 for
    ``--reference``); raise ``ValueError`` naming the fix. Returns the steps the job logs to metrics.jsonl."""
    a = parse_job_args(build_parser(), argv)
    _configs(a)
    _check_world(a, world_size)
    return a.steps


# ------------------------------------------------------------------------------------------ the job (each rank)

def _data(train_cfg: TrainConfig, seq_len: int):
    from labs_lib.data.text import TokenBatches, prepare_data

    # Every rank calls this; one prepares the corpus under prepare_data's file lock while the others wait.
    info = prepare_data(train_cfg.data, train_cfg.tokenizer_vocab, train_cfg.corpus_max_bytes,
                        train_cfg.val_fraction, progress=False)
    # Every stage reads the whole global batch: the pipeline splits layers, not data.
    return info, TokenBatches(info.train_path, train_cfg.batch_size, seq_len, rank=0, world_size=1,
                              seed=train_cfg.seed)


def _model(model_cfg: GPTConfig, train_cfg: TrainConfig, vocab: int):
    from labs_lib.models.gpt import GPT

    if model_cfg.vocab_size < vocab:
        raise ValueError(f"model vocab_size={model_cfg.vocab_size} < the tokenizer's {vocab}")
    torch.manual_seed(train_cfg.seed)  # every rank builds the same full model, then keeps its own stage(s)
    return GPT(model_cfg)


def _train(forward_backward, batches, optimizer, loop: Loop) -> list[dict]:
    """``loop.max_steps`` steps of ``forward_backward(x, y) -> {"loss": ..., ...}`` and the optimizer: the records."""
    device = loop.device or torch.device("cpu")

    def train_step(step: int) -> dict:
        x, y = (t.to(device) for t in next(batches))
        result = forward_backward(x, y)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result

    return run_loop(train_step, loop, optimizer=optimizer)


def _loop(a: argparse.Namespace, model_cfg: GPTConfig, train_cfg: TrainConfig, rank: int = 0,
          device: torch.device | None = None) -> Loop:
    return Loop(out=a.out, max_steps=a.steps, samples_per_step=train_cfg.batch_size * model_cfg.block_size,
                is_main=rank == 0, progress=not a.no_progress, desc="pipeline", device=device)


def _reference(a, model_cfg, train_cfg) -> None:
    info, batches = _data(train_cfg, model_cfg.block_size)
    model = _model(model_cfg, train_cfg, info.vocab_size)
    optimizer = make_optimizer(param_groups(model, train_cfg.weight_decay), train_cfg)

    def forward_backward(x, y) -> dict:
        loss = model(x, y)[1]
        loss.backward()
        return {"loss": loss.item()}

    records = _train(forward_backward, batches, optimizer, _loop(a, model_cfg, train_cfg))
    write_json(Path(a.out) / "reference.json", {"losses": [r["loss"] for r in records], "steps": a.steps,
                                                "model": model_cfg.to_dict(), "batch_size": train_cfg.batch_size,
                                                "lr": train_cfg.lr})


def _events(schedule, chunks: int) -> list[dict]:
    """The step's timeline, times from the step's start; each compute event with its model chunk. A micro-batch's
    forwards go through a rank's chunks in order 0, 1, … and its backwards in reverse (each needs the previous one's
    output), so the n-th forward of micro-batch i is chunk n and its n-th backward chunk v − 1 − n."""
    seen = Counter()
    events = []
    for e in schedule.timeline:
        chunk = 0
        if e.kind in ("forward", "backward"):
            n = seen[e.kind, e.micro_batch]
            seen[e.kind, e.micro_batch] += 1
            chunk = n if e.kind == "forward" else chunks - 1 - n
        events.append({"kind": e.kind, "micro_batch": e.micro_batch, "chunk": chunk,
                       "start": e.start - schedule.step_start, "end": e.end - schedule.step_start})
    return events


def _shown_step(records: list[dict], timelines: list[list[dict]]) -> dict:
    """The per-rank file's step fields: every step with its timeline, and the shown step (the least idle averaged
    over ranks, after the warm-up step: the same on every rank)."""
    import torch.distributed as dist

    per_step = [r | {"timeline": t} for r, t in zip(records, timelines)]
    idle = torch.tensor([s["idle_fraction"] for s in per_step], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(idle)
    candidates = range(1, len(per_step)) if len(per_step) > 1 else range(1)
    best = per_step[min(candidates, key=lambda i: idle[i].item())]
    return {"per_step": per_step, "shown_step": best["step"], "timeline": best["timeline"],
            "idle_fraction": best["idle_fraction"], "peak_in_flight": max(s["peak_in_flight"] for s in per_step),
            "peak_activation_bytes": max(s["peak_activation_bytes"] for s in per_step)}


def _pipeline(a, model_cfg, train_cfg, schedule_name: str, chunks: int) -> None:
    import torch.nn as nn

    from labs_lib.core.dist import cleanup, init_distributed
    from labs_lib.parallel.pipeline import make_schedule, partition_gpt

    dinfo = init_distributed()
    _check_world(a, dinfo.world_size)
    info, batches = _data(train_cfg, model_cfg.block_size)
    model = _model(model_cfg, train_cfg, info.vocab_size).to(dinfo.device)
    stages = [partition_gpt(model, dinfo.rank, a.pp, chunk=c, chunks=chunks) for c in range(chunks)]
    layout = [{"chunk": s.chunk, "stage_index": s.stage_index, "layers": [int(i) for i in s.blocks],
               "modules": [n for n, _ in s.named_children() if n not in ("blocks", "drop")],
               "params": sum(p.numel() for p in s.parameters())} for s in stages]
    del model  # the other stages' layers go away; this rank keeps its own
    optimizer = make_optimizer(param_groups(nn.ModuleList(stages), train_cfg.weight_decay), train_cfg)
    loop = _loop(a, model_cfg, train_cfg, dinfo.rank, dinfo.device)
    result = {"rank": dinfo.rank, "pp": a.pp, "schedule": schedule_name, "micro_batches": a.micro_batches,
              "chunks": chunks, "impl": a.impl, "compute_delay_s": a.compute_delay_s, "steps": a.steps,
              "model": model_cfg.to_dict(), "batch_size": train_cfg.batch_size, "lr": train_cfg.lr,
              "device": str(dinfo.device), "stages": layout,
              "data": f"{info.n_train_tokens:,} training tokens of {train_cfg.data or 'the Python standard library'}",
              "bubble_formula": bubble_fraction(a.pp, a.micro_batches, chunks)}
    if a.impl == "torch":
        step_fn = torch_schedule(stages, schedule_name, a.micro_batches, dinfo.device)
        records = _train(lambda x, y: {"loss": step_fn(x, y)}, batches, optimizer, loop)
        result["timeline"] = []  # torch's schedules keep no timeline we could read
    else:
        schedule = make_schedule(schedule_name, stages, a.micro_batches, compute_delay_s=a.compute_delay_s)
        timelines = []

        def forward_backward(x, y) -> dict:
            loss = schedule.step(x, y)
            timelines.append(_events(schedule, chunks))
            return {"loss": loss, "idle_fraction": schedule.idle_fraction(), "peak_in_flight": schedule.peak_in_flight,
                    "peak_activation_bytes": schedule.peak_activation_bytes}

        records = _train(forward_backward, batches, optimizer, loop)
        result.update(_shown_step(records, timelines))
    result["losses"] = [r["loss"] for r in records]
    write_json(Path(a.out) / f"pipeline_rank{dinfo.rank}.json", result, indent=None)
    cleanup()


def torch_schedule(stages, schedule_name: str, micro_batches: int, device: torch.device):
    """The production schedule, ``torch.distributed.pipelining``, over the same stage modules: ``step(x, y)`` runs
    one batch and returns its mean loss on every rank (gradients accumulate in the stages, like ours)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    from labs_lib.parallel.pipeline import gpt_loss

    num_stages = stages[0].pp_size * len(stages)
    torch_stages = [PipelineStage(s, s.stage_index, num_stages, device) for s in stages]
    # scale_grads=True (the default) divides the summed micro-batch gradients by m: our 1/m on each loss.
    if schedule_name == "interleaved-1f1b":
        schedule = ScheduleInterleaved1F1B(torch_stages, micro_batches, loss_fn=gpt_loss)
    else:
        schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name](torch_stages[0], micro_batches,
                                                                                 loss_fn=gpt_loss)
    has_first, has_last = stages[0].is_first, stages[-1].is_last

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        micro_losses: list[torch.Tensor] = []
        schedule.step(*([x] if has_first else []), **(dict(target=y, losses=micro_losses) if has_last else {}))
        for stage in stages:
            stage.sync_tied_grads()  # torch's stages know nothing of the tied embedding
        loss = torch.stack(micro_losses).mean().detach().float() if has_last else torch.zeros((), device=device)
        if dist.is_initialized():
            dist.broadcast(loss, src=stages[0].ranks[-1])
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    model_cfg, train_cfg, schedule, chunks = _configs(a)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.reference:
        _reference(a, model_cfg, train_cfg)
    else:
        _pipeline(a, model_cfg, train_cfg, schedule, chunks)


if __name__ == "__main__":
    from labs_lib.core.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it
