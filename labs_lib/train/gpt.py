"""Train the workshop GPT: one process, several with torchrun, or many nodes through Slurm.

    python -m labs_lib.train --profile ci --out build/runs/demo                  # one process
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train --profile ci --out build/runs/ddp
    sbatch slurm/train_gpt.sbatch --max-steps 200                                # 2 nodes x 2 processes
    python -m labs_lib.train --profile ci --out build/runs/demo --resume         # continue from "latest"
    torchrun --standalone --nproc-per-node=8 -m labs_lib.train --profile ci --out build/runs/3d \
        --tp 2 --pp 2 --micro-batches 4                                          # 2 replicas x 2 stages x 2 TP
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train --profile ci --out build/runs/z2 \
        --zero-stage 2 --activation-checkpointing selective                      # ZeRO-2 by hand, recompute
    python -m labs_lib.train --profile ci --out build/runs/moe --n-experts 4 --moe-top-k 2   # MoE every 2nd block
    python -m labs_lib.train --profile ci --out build/runs/tuned --init-from build/runs/demo \
        --data my_tasks/ --max-steps 100                                         # fine-tune: base weights, tokenizer
    torchrun --standalone --nproc-per-node=2 -m labs_lib.train --profile ci --out build/runs/ep \
        --n-experts 4 --ep 2                                                     # experts spread over 2 ranks

Data parallelism is torch's DistributedDataParallel. Each optimizer step sees ``batch_size x grad_accum x world``
sequences; the data loader hands every rank a disjoint slice of the same global batch, so 2 ranks with batch 4
see exactly what 1 process with batch 8 sees (and log the same losses).

With ``--tp`` / ``--pp`` the ranks form a DP x TP x PP mesh (labs_lib.parallel.mesh): the single-device GPT is
split by tensor parallelism, cut into pipeline stages, and each of the ``dp`` replicas of that pipeline reads its
own slice of the global batch (``batch_size x grad_accum x dp`` sequences per step). Checkpoints stay single-device
(weights gathered on save, sharded again on resume); the optimizer state is saved per shard, so resuming needs the
same ``--tp``/``--pp``/``--pp-chunks``.

Memory saving: ``--activation-checkpointing full|selective`` (labs_lib.parallel.recompute) recomputes each
transformer block (or the cheap parts of it) in backward, on any layout. ``--zero-stage 1|2|3`` replaces DDP with
ZeRO by hand (labs_lib.parallel.zero; data parallelism only): weights are gathered whole into the checkpoint, each
rank saves its own optimizer shard, so resuming needs the same stage and number of ranks.

Memory, measured on every layout: each record has ``mem_rank<r>``, the bytes of parameters, gradients and optimizer
state rank r holds after the step (labs_lib.measure.memory.held_bytes; DDP's own gradient buckets are not counted),
and with ``--measure-activations`` ``act_rank<r>``, the most bytes rank r kept for backward at once during the step
(labs_lib.train.steps). ``LABS_MEMORY_CAP_BYTES`` (labs_lib.jobs.launch's ``memory_cap_gb``) gives each rank a cap
that plays a GPU's memory: past it the rank fails with "out of memory: rank r needs more than the ... GB memory cap"
(labs_lib.core.memcap). Outputs in ``--out``:

    metrics.jsonl   one JSON object per step: step, loss, lr, grad_norm, tokens_per_s, ... (+ val_loss)
    config.json     the resolved model / train settings and world size
    tokenizer.json  the BPE tokenizer the run was trained with (``--init-from``: its base's)
    checkpoints/    see labs_lib.core.checkpoint (atomic, the newest ``keep_checkpoints`` kept)

The loop is labs_lib.train.loop.run_loop, the step of each layout a strategy of labs_lib.train.steps (data parallel,
ZeRO by hand, DP x TP x PP), checkpoints labs_lib.train.resume, the flags labs_lib.train.cli.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from labs_lib.core import checkpoint
from labs_lib.core.config import GPTConfig, ParallelConfig, TrainConfig
from labs_lib.core.dist import cleanup, exit_process, init_distributed, print0
from labs_lib.core.memcap import memory_cap
from labs_lib.core.runs import truncate_metrics, write_json
from labs_lib.data.text import DataError, TokenBatches, eval_batches, prepare_data
from labs_lib.measure.trace import profile_steps
from labs_lib.models.gpt import GPT
from labs_lib.parallel.mesh import build_mesh, check_layout
from labs_lib.parallel.rng import TP_RNG, get_rng_tracker, tensor_parallel_manual_seed
from labs_lib.train.cli import build_parser, check_args, check_trainer_args, world_size_from_env
from labs_lib.train.loop import Loop, run_loop
from labs_lib.train.optim import lr_at
from labs_lib.train.resume import check_resumable, save_checkpoint
from labs_lib.train.steps import evaluate, make_strategy, step_fields, train_step

__all__ = ["train", "main", "check_args"]  # check_args: the job module's pre-launch check (labs_lib.jobs.launch)
APPLIES_MEMORY_CAP = True  # its ranks set LABS_MEMORY_CAP_BYTES (labs_lib.jobs.launch refuses a cap otherwise)


def _prepare_run(out: Path, model_cfg, cfg, parallel, info, progress: bool):
    """The corpus (tokenized once, cached) and the run folder's config.json and tokenizer.json."""
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    base = checkpoint.resolve_run(cfg.init_from)[1] / "tokenizer.json" if cfg.init_from else None
    data = prepare_data(cfg.data, cfg.tokenizer_vocab, cfg.corpus_max_bytes, cfg.val_fraction,
                        progress=progress and info.is_main, tokenizer=base)
    meta = {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "parallel": parallel.to_dict(),
            "world_size": info.world_size, "data_dir": str(data.dir)}
    if info.is_main:
        shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
        write_json(out / "config.json", meta)
    return data, meta


def _resume(latest: Path, strategy, batches: TokenBatches, info) -> int:
    """Restore the optimizer, data position and RNG states of ``latest``; returns its step."""
    strategy.load_checkpoint(latest)
    saved = checkpoint.load_meta(latest)
    batches.load_state_dict(saved["data"])
    rank_state = checkpoint.load_rank_state(latest, info.rank)
    if rank_state is not None and "tensor_parallel_torch" in rank_state:
        get_rng_tracker().states[TP_RNG] = (rank_state["tensor_parallel_torch"],
                                            rank_state.get("tensor_parallel_cuda"))
    print0(f"resumed from {latest} (step {saved['step']})")
    return saved["step"]


def train(model_cfg: GPTConfig, cfg: TrainConfig, out: str | Path, resume: bool = False,
          progress: bool = True, parallel: ParallelConfig | None = None,
          measure_activations: bool = False) -> list[dict]:
    """Run (or resume) training in this process, as one rank of whatever launched it. Returns the metrics.

    ``parallel``: the DP x TP x PP layout (default: data parallel over all ranks). ``measure_activations``: every
    record gets ``act_rank<r>``. Under ``LABS_MEMORY_CAP_BYTES`` (labs_lib.core.memcap) what the run builds after
    start-up (imports, process group, corpus) counts against the cap, as a GPU's memory would hold it."""
    info = init_distributed()
    out = Path(out)
    parallel = check_layout(model_cfg, cfg, parallel or ParallelConfig(), info.world_size, info.device.type)
    latest = checkpoint.latest_checkpoint(out / "checkpoints") if resume else None
    if latest is not None:  # before anything is written to the run folder
        check_resumable(checkpoint.load_meta(latest), parallel, cfg, info.world_size, latest)
    data, meta = _prepare_run(out, model_cfg, cfg, parallel, info, progress)
    with memory_cap(info.rank):
        records = _train(info, out, model_cfg, cfg, parallel, latest, data, meta, progress, measure_activations)
    cleanup()
    return records


def _train(info, out: Path, model_cfg: GPTConfig, cfg: TrainConfig, parallel: ParallelConfig, latest: Path | None,
           data, meta: dict, progress: bool, measure_activations: bool) -> list[dict]:
    """The run itself: model, strategy, data stream, resume, the loop."""
    # Tensor or pipeline parallelism: a mesh of process groups; data parallelism alone: DDP or ZeRO over the world.
    mesh = build_mesh(parallel, info.rank, info.world_size) if parallel.tp * parallel.pp > 1 else None
    dp_rank = mesh.dp_rank if mesh else info.rank
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = GPT(model_cfg)
    if cfg.init_from and latest is None:  # a fine-tune starts from its base; a resumed one from its own checkpoint
        model.load_state_dict(checkpoint.load_model_state(checkpoint.resolve_run(cfg.init_from)[0]))
    strategy = make_strategy(model.to(info.device), cfg, parallel, info, mesh, latest, measure_activations)
    # Every TP and PP rank of one replica reads the same batch: the replica's slice of the global batch.
    batches = TokenBatches(data.train_path, cfg.batch_size, model_cfg.block_size, dp_rank, parallel.dp,
                           seed=cfg.seed)
    val = eval_batches(data.val_path, cfg.batch_size, model_cfg.block_size, cfg.eval_iters, dp_rank, parallel.dp)
    if mesh is None:
        torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout masks differ between ranks
    else:  # alike within a TP group (replicated activations), different per replica and stage
        tensor_parallel_manual_seed(cfg.seed + 1 + dp_rank + parallel.dp * mesh.pp_rank, mesh.tp_group)
    start = _resume(latest, strategy, batches, info) if latest is not None else 0
    if info.is_main:
        truncate_metrics(out, start)  # a fresh run starts an empty metrics.jsonl, a resumed one its kept steps

    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.dtype == "fp16")
    loop = Loop(out=out, max_steps=cfg.max_steps, start=start, device=info.device, is_main=info.is_main,
                samples_per_step=cfg.batch_size * model_cfg.block_size * cfg.grad_accum * parallel.dp,
                eval_every=cfg.eval_interval, checkpoint_every=cfg.checkpoint_interval, progress=progress)
    tracer = profile_steps(out / "trace", info.rank, active=cfg.trace_steps) if cfg.trace_steps else None
    records = run_loop(lambda step: train_step(strategy, batches, cfg, info.device, scaler), loop,
                       optimizer=strategy.optimizer, lr_of=lambda step: lr_at(step, cfg),
                       evaluate=(lambda step: {"val_loss": evaluate(strategy.evaluated, val, cfg.dtype, info.device)})
                       if cfg.eval_interval else None,
                       save=lambda step: save_checkpoint(out, step, strategy, batches, meta, info, cfg),
                       profiler=tracer, record_fields=lambda result: step_fields(result, info, info.device))
    return records


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:  # every bad setting fails here, before any process group exists
        model_cfg, train_cfg, parallel = check_trainer_args(args, world_size_from_env())
    except ValueError as e:
        raise SystemExit(f"invalid configuration: {e}") from None
    try:
        train(model_cfg, train_cfg, args.out, resume=args.resume, progress=not args.no_progress, parallel=parallel,
              measure_activations=args.measure_activations)
    except DataError as e:  # known only once the corpus is tokenized: one line, no traceback
        raise SystemExit(f"the data cannot feed this run: {e}") from None


if __name__ == "__main__":
    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it
