"""Pipeline-parallel training of the workshop GPT as a job: every rank writes its timeline to a file (lab 05).

    torchrun --standalone --nproc-per-node=4 -m labs_lib.parallel.pipeline_run --pp 4 --micro-batches 8 \\
        --schedule 1f1b --steps 3 --compute-delay-s 0.03 --n-layer 8 --profile ci --out build/runs/pp
    python -m labs_lib.parallel.pipeline_run --reference --steps 3 --n-layer 8 --profile ci --out build/runs/ref
    (add --impl torch to run torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B / ScheduleInterleaved1F1B
    over the same stages: the production implementation, for comparison; it writes losses, no timeline)

From a notebook (the job never runs inside the kernel; these launch it and read its files back):

    results = run("build/runs/pp", pp=4, micro_batches=8, schedule="1f1b", compute_delay_s=0.03, n_layer=8)
    reference = run_reference("build/runs/ref", n_layer=8)       # the same steps on one process
    results[0]["losses"], reference["losses"]                     # equal to float rounding

Every rank builds the profile's GPT from the same seed (flags override its shape), keeps its stage(s) of
:func:`~labs_lib.parallel.pipeline.partition_gpt`, and takes ``--steps`` AdamW steps (constant learning rate, no
gradient clipping) on real batches: the profile's corpus and tokenizer (:func:`labs_lib.data.prepare_data`), every
rank reading the same global batch from :class:`~labs_lib.data.TokenBatches` (the first stage uses its tokens,
the last its targets). ``--reference`` takes the same steps with the whole model in one process.

Files in ``--out``:
    pipeline_rank<r>.json  rank r's layout (layers, modules, parameters per chunk), the losses, and per step its
                           timeline (forward / backward / send / recv / idle events, seconds from the step's start),
                           idle fraction, peak in-flight micro-batches and peak activation bytes. The top-level
                           ``timeline`` / ``idle_fraction`` are those of the ``shown_step``: of the steps after the
                           first (a warm-up), the one with the least idle time averaged over ranks, the same step on
                           every rank (other processes on shared cores can only add idle time).
    reference.json         ``--reference``: the losses of one process
    progress.jsonl         one line per finished step (the notebook's progress bar)
    pipeline.log           the job's output
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from labs_lib.config import GPTConfig, TrainConfig, get_profile, override, validate
from labs_lib.launch import run_child
from labs_lib.parallel.pipeline import SCHEDULES, bubble_fraction, check_pipeline

__all__ = ["run", "run_reference", "read_results", "check_args", "cli_args", "measured_bubble", "order",
           "layout_rows", "main"]

SCHEDULE_ALIASES = {"interleaved": "interleaved-1f1b"}  # --schedule interleaved is short for interleaved-1f1b


# ------------------------------------------------------------------------------------------ configuration

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.parallel.pipeline_run", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for pipeline_rank<r>.json (or reference.json)")
    p.add_argument("--profile", help="run profile: ci, cpu or gpu (default: LABS_PROFILE, else by machine)")
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
    for name in ("n-layer", "n-head", "n-embd", "block-size", "batch-size", "seed"):
        p.add_argument(f"--{name}", type=int, help="override the profile's value")
    p.add_argument("--lr", type=float, help="override the profile's learning rate (constant here)")
    return p


def cli_args(out: str | Path, pp: int = 1, micro_batches: int = 1, schedule: str = "1f1b", chunks: int | None = None,
             steps: int = 3, compute_delay_s: float = 0.0, profile: str | None = None, reference: bool = False,
             **overrides) -> list[str]:
    """The command line of the job for these settings (``n_layer=8`` → ``--n-layer 8``)."""
    args = ["--out", str(out), "--pp", str(pp), "--micro-batches", str(micro_batches), "--schedule", schedule,
            "--steps", str(steps), "--compute-delay-s", str(compute_delay_s)]
    if chunks is not None:
        args += ["--chunks", str(chunks)]
    if profile:
        args += ["--profile", profile]
    if reference:
        args.append("--reference")
    for name, value in overrides.items():
        if value is not None:
            args += ["--" + name.replace("_", "-"), str(value)]
    return args


def _configs(a: argparse.Namespace) -> tuple[GPTConfig, TrainConfig, str, int]:
    """Model and train configs, the schedule's full name and the chunks per rank; ``ValueError`` naming the fix."""
    profile = get_profile(a.profile)
    model_cfg = override(profile.model, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                         block_size=a.block_size)
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


def check_args(args: list[str]) -> tuple[GPTConfig, TrainConfig, str, int]:
    """Parse and check exactly what the job will see; raise ``ValueError`` naming the fix (before any process)."""
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as e:  # argparse exits on a bad flag; a notebook wants an exception
        raise ValueError(f"bad arguments for the pipeline job: {' '.join(args)}") from e
    return _configs(parsed)


# ------------------------------------------------------------------------------------------ the job (each rank)

def _data(train_cfg: TrainConfig, seq_len: int, progress: bool = False):
    from labs_lib.data import TokenBatches, prepare_data

    info = prepare_data(train_cfg.data, train_cfg.tokenizer_vocab, train_cfg.corpus_max_bytes,
                        train_cfg.val_fraction, progress=progress)
    # Every stage reads the whole global batch: the pipeline splits layers, not data.
    return info, TokenBatches(info.train_path, train_cfg.batch_size, seq_len, rank=0, world_size=1,
                              seed=train_cfg.seed)


def _model(model_cfg: GPTConfig, train_cfg: TrainConfig, vocab: int):
    from labs_lib.model import GPT

    if model_cfg.vocab_size < vocab:
        raise ValueError(f"model vocab_size={model_cfg.vocab_size} < the tokenizer's {vocab}")
    torch.manual_seed(train_cfg.seed)  # every rank builds the same full model, then keeps its own stage(s)
    return GPT(model_cfg)


def _optimizer(params, train_cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             weight_decay=train_cfg.weight_decay)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # the reader never sees half a file


def _progress(out: Path, step: int, loss: float) -> None:
    with open(out / "progress.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def _reference(a, model_cfg, train_cfg, out: Path) -> None:
    info, batches = _data(train_cfg, model_cfg.block_size)
    model = _model(model_cfg, train_cfg, info.vocab_size)
    optimizer = _optimizer(model.parameters(), train_cfg)
    losses = []
    for step in range(1, a.steps + 1):
        x, y = next(batches)
        loss = model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        _progress(out, step, losses[-1])
    _write_json(out / "reference.json", {"losses": losses, "steps": a.steps, "model": model_cfg.to_dict(),
                                         "batch_size": train_cfg.batch_size, "lr": train_cfg.lr})


def _events(schedule, chunks: int) -> list[dict]:
    """The step's timeline, times from the step's start; each compute event with its model chunk."""
    units = {"forward": 0, "backward": 0}  # the k-th forward / backward of the step is work unit k
    events = []
    for e in schedule.timeline:
        chunk = 0
        if e.kind in units:
            if chunks > 1:
                chunk = schedule._unit(units[e.kind], forward=e.kind == "forward")[1]
            units[e.kind] += 1
        events.append({"kind": e.kind, "micro_batch": e.micro_batch, "chunk": chunk,
                       "start": e.start - schedule.step_start, "end": e.end - schedule.step_start})
    return events


def _pipeline(a, model_cfg, train_cfg, schedule_name: str, chunks: int, out: Path) -> None:
    import torch.distributed as dist
    import torch.nn as nn

    from labs_lib.dist import cleanup, init_distributed
    from labs_lib.parallel.pipeline import make_schedule, partition_gpt

    dinfo = init_distributed()
    if dinfo.world_size != a.pp:
        raise ValueError(f"--pp {a.pp} but {dinfo.world_size} processes: launch --nproc-per-node={a.pp}")
    info, batches = _data(train_cfg, model_cfg.block_size)
    model = _model(model_cfg, train_cfg, info.vocab_size).to(dinfo.device)
    stages = [partition_gpt(model, dinfo.rank, a.pp, chunk=c, chunks=chunks) for c in range(chunks)]
    layout = [{"chunk": s.chunk, "stage_index": s.stage_index, "layers": [int(i) for i in s.blocks],
               "modules": [n for n, _ in s.named_children() if n not in ("blocks", "drop")],
               "params": sum(p.numel() for p in s.parameters())} for s in stages]
    del model  # the other stages' layers go away; this rank keeps its own
    optimizer = _optimizer(nn.ModuleList(stages).parameters(), train_cfg)
    result = {"rank": dinfo.rank, "pp": a.pp, "schedule": schedule_name, "micro_batches": a.micro_batches,
              "chunks": chunks, "impl": a.impl, "compute_delay_s": a.compute_delay_s, "steps": a.steps,
              "model": model_cfg.to_dict(), "batch_size": train_cfg.batch_size, "lr": train_cfg.lr,
              "device": str(dinfo.device), "stages": layout,
              "data": f"{info.n_train_tokens:,} training tokens of {train_cfg.data or 'the Python standard library'}",
              "bubble_formula": bubble_fraction(a.pp, a.micro_batches, chunks)}
    if a.impl == "torch":
        step_fn = _torch_schedule(stages, schedule_name, a.micro_batches, dinfo.device)
        losses = []
        for step in range(1, a.steps + 1):
            x, y = (t.to(dinfo.device) for t in next(batches))
            losses.append(step_fn(x, y))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if dinfo.rank == 0:
                _progress(out, step, losses[-1])
        result.update(losses=losses, timeline=[])  # torch's schedules keep no timeline we could read
        _write_json(out / f"pipeline_rank{dinfo.rank}.json", result)
        cleanup()
        return

    schedule = make_schedule(schedule_name, stages, a.micro_batches, compute_delay_s=a.compute_delay_s)
    per_step = []
    for step in range(1, a.steps + 1):
        x, y = (t.to(dinfo.device) for t in next(batches))
        loss = schedule.step(x, y)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        per_step.append({"step": step, "loss": loss, "step_time_s": schedule.step_end - schedule.step_start,
                         "idle_fraction": schedule.idle_fraction(), "peak_in_flight": schedule.peak_in_flight,
                         "peak_activation_bytes": schedule.peak_activation_bytes,
                         "timeline": _events(schedule, chunks)})
        if dinfo.rank == 0:
            _progress(out, step, loss)

    # The shown step: the least idle averaged over ranks (after the warm-up step), the same on every rank.
    idle = torch.tensor([s["idle_fraction"] for s in per_step], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(idle)
    candidates = range(1, a.steps) if a.steps > 1 else range(1)
    best = per_step[min(candidates, key=lambda i: idle[i].item())]
    result.update(losses=[s["loss"] for s in per_step], per_step=per_step, shown_step=best["step"],
                  timeline=best["timeline"], idle_fraction=best["idle_fraction"], step_time_s=best["step_time_s"],
                  peak_in_flight=max(s["peak_in_flight"] for s in per_step),
                  peak_activation_bytes=max(s["peak_activation_bytes"] for s in per_step))
    _write_json(out / f"pipeline_rank{dinfo.rank}.json", result)
    cleanup()


def _torch_schedule(stages, schedule_name: str, micro_batches: int, device: torch.device):
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
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.reference:
        _reference(a, model_cfg, train_cfg, out)
    else:
        _pipeline(a, model_cfg, train_cfg, schedule, chunks, out)


# ------------------------------------------------------------------------------------------ from the notebook

def _launch(cmd: list[str], out: Path, steps: int, desc: str, progress: bool, timeout_s: float) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    try:
        run_child(cmd, out / "pipeline.log", lambda: _advance(bar, out), timeout_s, what="pipeline")
    finally:
        bar.close()


def _advance(bar, out: Path) -> None:
    """Move the progress bar to the steps the job has finished (rank 0 appends one line per step)."""
    path = out / "progress.jsonl"
    done = path.read_text().split("\n")[:-1] if path.exists() else []  # whole lines only
    if done and len(done) != bar.n:
        bar.n = len(done)
        bar.set_postfix(loss=f"{json.loads(done[-1])['loss']:.3f}")
        bar.refresh()


def _fresh(out: str | Path) -> Path:
    out = Path(out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _prepare_data(args: list[str], progress: bool) -> None:
    """Tokenize the corpus here once (cached), so that the ranks start on ready data."""
    _, train_cfg, _, _ = check_args(args)
    from labs_lib.data import prepare_data

    prepare_data(train_cfg.data, train_cfg.tokenizer_vocab, train_cfg.corpus_max_bytes, train_cfg.val_fraction,
                 progress=progress)


def run(out: str | Path, pp: int, micro_batches: int, schedule: str = "1f1b", chunks: int | None = None,
        steps: int = 3, compute_delay_s: float = 0.0, profile: str | None = None, progress: bool = True,
        timeout_s: float = 600, **overrides) -> list[dict]:
    """Run the pipeline job on ``pp`` local processes (torchrun, gloo on CPU); returns each rank's results, by rank.

    ``overrides``: ``n_layer``, ``n_head``, ``n_embd``, ``block_size``, ``batch_size``, ``lr``, ``seed``, and
    ``impl="torch"`` to run ``torch.distributed.pipelining``'s schedule over the same stages instead of ours (losses
    only: no timeline, no compute delay). A layout
    that cannot run raises ``ValueError`` naming the fix before any process starts; a failed job raises
    :class:`labs_lib.launch.LaunchError` with the log's tail. ``out`` is emptied first."""
    args = cli_args("OUT", pp, micro_batches, schedule, chunks, steps, compute_delay_s, profile, **overrides)
    _, _, name, v = check_args(args)
    _prepare_data(args, progress)
    out = _fresh(out)
    args[1] = str(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={pp}",
           "-m", "labs_lib.parallel.pipeline_run", *args]
    _launch(cmd, out, steps, f"{name} p={pp} m={micro_batches}" + (f" v={v}" if v > 1 else ""), progress,
            timeout_s)
    return read_results(out)


def run_reference(out: str | Path, steps: int = 3, profile: str | None = None, progress: bool = True,
                  timeout_s: float = 600, **overrides) -> dict:
    """The same ``steps`` on one process with the whole model (same seed, data, optimizer); returns its results."""
    args = cli_args("OUT", steps=steps, profile=profile, reference=True, **overrides)
    check_args(args)
    _prepare_data(args, progress)
    out = _fresh(out)
    args[1] = str(out)
    _launch([sys.executable, "-m", "labs_lib.parallel.pipeline_run", *args], out, steps, "one process", progress,
            timeout_s)
    return json.loads((out / "reference.json").read_text())


def read_results(out: str | Path) -> list[dict]:
    """The ``pipeline_rank<r>.json`` files of a finished job, by rank."""
    files = sorted(Path(out).glob("pipeline_rank*.json"), key=lambda p: int(p.stem.removeprefix("pipeline_rank")))
    if not files:
        raise FileNotFoundError(f"no pipeline_rank<r>.json in {out}: has the job run? (see its pipeline.log)")
    return [json.loads(f.read_text()) for f in files]


# ------------------------------------------------------------------------------------------ reading the results

def measured_bubble(results: list[dict]) -> float:
    """The shown step's idle fraction, averaged over ranks (the formula predicts the same on every rank)."""
    return sum(r["idle_fraction"] for r in results) / len(results)


def order(result: dict) -> list[str]:
    """A rank's compute order in the shown step: ``F3`` = forward of micro-batch 3, ``B0`` = backward of 0
    (``F3'`` = chunk 1 when interleaved)."""
    return [f"{e['kind'][0].upper()}{e['micro_batch']}" + "'" * e["chunk"] for e in result["timeline"]
            if e["kind"] in ("forward", "backward")]


def layout_rows(results: list[dict]) -> list[dict]:
    """One row per (rank, chunk): which layers and which other modules it holds, and its parameters."""
    rows = []
    for r in results:
        for s in r["stages"]:
            layers = s["layers"]
            rows.append({"rank": r["rank"], "chunk": s["chunk"], "stage": s["stage_index"],
                         "blocks": f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0]),
                         "other modules": ", ".join(s["modules"]) or "-", "parameters": f"{s['params']:,}"})
    return rows


if __name__ == "__main__":
    from labs_lib.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it
