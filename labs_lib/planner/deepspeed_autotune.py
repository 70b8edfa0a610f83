"""DeepSpeed's own autotuner on the workshop GPT, started the way its users start it; its choice read back.

    from labs_lib.planner.deepspeed_autotune import run_deepspeed_autotuner
    result = run_deepspeed_autotuner("build/runs/ds_autotune")     # this machine as one node of 2 ranks
    result["best"], result["table"], result["log"]                  # DeepSpeed's choice, its trials, its log
    run_deepspeed_autotuner(out, nodes=["node1", "node2"])         # a hostfile naming the local cluster's nodes

The command (also in ``out/command.txt``) is the one of DeepSpeed's autotuning tutorial, with a hostfile or without::

    deepspeed --autotuning tune --num_nodes 1 --num_gpus 2 --master_port P \\
        labs_lib/planner/deepspeed_autotune.py --deepspeed_config out/autotune.json --profile ci --no-progress ...
    deepspeed --autotuning tune --hostfile out/hostfile --master_port P labs_lib/planner/deepspeed_autotune.py ...

configs/deepspeed/autotune.json is the workshop's ZeRO config with lists where the autotuner searches (ZeRO stages 0
and 1, micro-batches 2 and 4 at one global batch: the accumulation makes up the rest) and ``"autotuning":
{"enabled": true, "metric": "throughput", "fast": true, ...}``. The autotuner first runs a model-info experiment
(ZeRO-3, micro-batch 1: the parameter count, and one micro-batch's activation bytes, which DeepSpeed's CPU
accelerator measures as the rank's resident-memory growth), then one experiment per stage and micro-batch, each a
fresh ``deepspeed`` launch of this file: the engine times steps ``start_profile_step`` to ``end_profile_step``, writes
``metrics.json`` (throughput in samples/s, latency in µs per step, FLOPS per GPU) and exits. DeepSpeed leaves
``out/autotuning_results/`` (a folder per experiment, ``summary.txt``, ``ds_config_optimal.json``,
``cmd_optimal.txt``) and ``out/autotuning_exps/``; :func:`read_results` turns them into Python data. ``--autotuning
run`` would then launch ``cmd_optimal.txt``: in DeepSpeed 0.19.8 that is the winning experiment's own command, its
autotuning section included, so it stops after the same profiled steps and overwrites that experiment's
metrics.json; this module tunes only.

This file is also the training script DeepSpeed launches (:func:`main`): the autotuner passes each experiment's
config as base64 JSON after ``--deepspeed_config``, the launcher adds ``--local_rank=N``, and main hands the trainer
(labs_lib.train.deepspeed.gpt) that config with the micro-batch and accumulation it names.

Where it stops with a hostfile (DeepSpeed 0.19.8): DeepSpeed reaches the hosts of a hostfile through passwordless
ssh and pdsh only. ``deepspeed/launcher/runner.py`` ``main()`` first runs ``ssh node1 hostname`` (RuntimeError "...
was not reachable via ssh" when it fails) and launches multi-host jobs through ``PDSHRunner``. ``--no_ssh_check``
and ``--master_addr`` help the first launch only (and ``--launcher`` is not read at all with ``--autotuning``):
``deepspeed/autotuning/scheduler.py`` ``run_experiment()`` relaunches every experiment as ``deepspeed --hostfile H
--include node1:0,1@node2:0,1 --master_port P ...``, which checks ssh again and needs pdsh. The local cluster's
simulated nodes are reached through Slurm, not ssh (no sshd, no pdsh, names that do not resolve), so there the first
launch or the first experiment fails and :class:`AutotunerStopped` says where and why; on a GPU cluster with pdsh
and passwordless ssh the same command runs. Without a hostfile it runs here, on the CPU accelerator: it counts
``LOCAL_SIZE`` devices and the experiments start as local processes. After each experiment
``scheduler.clean_up()`` runs ``pdsh ... pkill``; without pdsh that leaves a FileNotFoundError traceback per
experiment in the log, after the experiment's results are written.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from tqdm.auto import tqdm

from labs_lib.core.config import get_profile
from labs_lib.core.runs import fresh_run_dir, read_json, read_metrics, write_json
from labs_lib.jobs.process import LaunchError, first_error, read_log, run_child

SCRIPT = Path(__file__).resolve()
CONFIG = "autotune.json"  # in configs/deepspeed/
RESULTS, EXPERIMENTS, LOG = "autotuning_results", "autotuning_exps", "autotuner.log"
MODEL_INFO = "profile_model_info"  # the autotuner's first experiment
NO_HOST_REACH = ("not reachable via ssh", "launcher 'pdsh' not installed", "Could not resolve hostname")


class AutotunerStopped(RuntimeError):
    """DeepSpeed's autotuner ended without choosing a configuration: where it stopped, and why."""


# ------------------------------------------------------------------------------------------------------ the launch
def autotune_config(ds_config: str | Path, out: Path) -> dict:
    """The DeepSpeed config with its ``autotuning`` section checked, its result folders placed in ``out``."""
    from labs_lib.train.deepspeed.config import load_ds_config

    ds = load_ds_config(ds_config)
    tuning = ds.get("autotuning", {})
    if not tuning.get("enabled"):
        raise ValueError(f"{ds_config} has no \"autotuning\": {{\"enabled\": true, ...}} section: add one (see "
                         f"configs/deepspeed/{CONFIG})")
    if tuning.get("end_profile_step", 5) <= tuning.get("start_profile_step", 3):
        raise ValueError("autotuning.end_profile_step must come after start_profile_step: the engine times the "
                         "steps between them")
    tuning.update(results_dir=str(out / RESULTS), exps_dir=str(out / EXPERIMENTS))
    return ds


def deepspeed_command(out: Path, ds: dict, nodes: list[str] | None, procs_per_node: int, profile: str, port: int,
                      launcher_args: tuple[str, ...] = ()) -> list[str]:
    """The ``deepspeed --autotuning tune`` command line: a hostfile of ``nodes``, or this machine as one node."""
    if nodes:
        (out / "hostfile").write_text("".join(f"{node} slots={procs_per_node}\n" for node in nodes))
        where = ["--hostfile", str(out / "hostfile")]
    else:
        where = ["--num_nodes", "1", "--num_gpus", str(procs_per_node)]
    # The trainer runs past the last profiled step: the engine writes metrics.json there and exits.
    steps = ds["autotuning"].get("end_profile_step", 5) + 2
    trainer = ["--deepspeed_config", str(out / CONFIG), "--profile", profile, "--no-progress",
               "--max-steps", str(steps), "--eval-interval", "0", "--checkpoint-interval", "0"]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--autotuning", "tune", *where, "--master_port", str(port), *launcher_args, str(SCRIPT),
            *trainer]


def run_deepspeed_autotuner(out_dir: str | Path, nodes: list[str] | None = None, procs_per_node: int = 2,
                            ds_config: str | Path = CONFIG, profile: str = "ci", launcher_args: tuple[str, ...] = (),
                            progress: bool = True, timeout_s: float = 900) -> dict:
    """Run DeepSpeed's autotuner once on the workshop GPT (``profile``'s shape and data) and read its choice back.

    ``nodes``: host names for a hostfile of ``procs_per_node`` slots each (DeepSpeed then needs pdsh and
    passwordless ssh to them); None: this machine as one node of ``procs_per_node`` ranks. ``launcher_args``: more
    ``deepspeed`` launcher flags (e.g. ``("--no_ssh_check", "--master_addr", "127.0.0.1")``). Returns
    :func:`read_results`'s dict plus ``"command"``; raises :class:`AutotunerStopped` when DeepSpeed chose nothing."""
    from labs_lib.core.dist import free_ports
    from labs_lib.train.deepspeed.setup import configure_environment

    if procs_per_node < 1:
        raise ValueError(f"procs_per_node={procs_per_node}: give at least 1 rank per node")
    get_profile(profile)  # an unknown profile fails here, not in every experiment
    out = Path(out_dir).resolve()
    ds = autotune_config(ds_config, out)  # a bad config fails before the folder is emptied
    fresh_run_dir(out)
    write_json(out / CONFIG, ds)
    cmd = deepspeed_command(out, ds, nodes, procs_per_node, profile, free_ports(1)[0], launcher_args)
    (out / "command.txt").write_text(shlex.join(cmd) + "\n")
    configure_environment()  # DS_ACCELERATOR=cpu without a GPU, the op cache of `make setup`, the venv on PATH
    # LOCAL_SIZE: the CPU accelerator's device count (the launcher's slots without a hostfile); LOCAL_WORLD_SIZE:
    # the ranks per node, so that labs_lib.core.dist splits the cores between them.
    env = {"LOCAL_SIZE": str(procs_per_node), "LOCAL_WORLD_SIZE": str(procs_per_node)}
    bar = tqdm(desc="DeepSpeed autotuner", unit="experiment", disable=not progress)

    def show_started() -> None:
        bar.n = len(list((out / RESULTS).glob("*/exp.json")))
        bar.refresh()

    try:
        run_child(cmd, out / LOG, on_poll=show_started, timeout_s=timeout_s, what="DeepSpeed autotuner", env=env)
    except LaunchError as failed:
        raise AutotunerStopped(stop_report(out, read_log(out / LOG))) from failed
    finally:
        bar.close()
    return {**read_results(out, profile), "command": shlex.join(cmd)}


# ----------------------------------------------------------------------------------------------------- the results
def _experiment_row(exp: dict, folder: Path, block_size: int) -> dict:
    ds = exp["ds_config"]
    metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").exists() else {}
    throughput = metrics.get("throughput")
    # The trainer's own clock over the steps DeepSpeed timed (its records of the steps after start_profile_step)
    start = ds["autotuning"].get("start_profile_step", 3)
    timed = [r["tokens_per_s"] for r in read_metrics(folder / "run") if r["step"] > start]
    return {"experiment": exp["name"], "zero_stage": ds.get("zero_optimization", {}).get("stage", 0),
            "micro_batch": ds["train_micro_batch_size_per_gpu"], "grad_accum": ds.get("gradient_accumulation_steps"),
            "global_batch": ds.get("train_batch_size"), "throughput": throughput,
            "tokens_per_s": throughput * block_size if throughput else None,
            "trainer_tokens_per_s": statistics.median(timed) if timed else None,
            "latency_ms": metrics["latency"] / 1000 if "latency" in metrics else None,
            "flops_per_gpu": metrics.get("FLOPS_per_gpu"), "error": first_error(read_log(folder / "stderr.log"))}


def read_results(out: str | Path, profile: str = "ci") -> dict:
    """What DeepSpeed's autotuner left in ``out``: ``best`` (the winning row, with ``config``: DeepSpeed's
    ds_config_optimal.json), ``table`` (a row per tuning experiment, in the order they ran: experiment, zero_stage,
    micro_batch, grad_accum, global_batch, throughput in samples/s and tokens_per_s as DeepSpeed timed them,
    trainer_tokens_per_s as the trainer's loop timed them, latency_ms per step, flops_per_gpu, error),
    ``model_info`` (the first experiment's parameter count and activation bytes), ``summary`` (summary.txt's rows)
    and ``log``. Raises :class:`AutotunerStopped` when DeepSpeed chose nothing."""
    out = Path(out)
    results = out / RESULTS
    block_size = get_profile(profile).model.block_size
    experiments = sorted(((read_json(path), path.parent) for path in results.glob("*/exp.json")),
                         key=lambda found: found[0]["exp_id"])
    table = [_experiment_row(exp, folder, block_size) for exp, folder in experiments if exp["name"] != MODEL_INFO]
    optimal = results / "ds_config_optimal.json"
    if not optimal.exists():
        failed = next((folder for _, folder in experiments if first_error(read_log(folder / "stderr.log"))), None)
        if failed is None:
            raise AutotunerStopped("DeepSpeed's autotuner chose no configuration: no experiment wrote its metrics "
                                   f"(each must train past autotuning.end_profile_step); full log: {out / LOG}")
        raise AutotunerStopped(stop_report(out, read_log(failed / "stderr.log"), failed))
    summary = _summary_rows(results / "summary.txt")
    best = next(row for row in table if row["experiment"] == summary[-1]["best_exp_name"])
    info = results / MODEL_INFO / "model_info.json"
    return {"best": {**best, "config": read_json(optimal)}, "table": table,
            "model_info": read_json(info) if info.exists() else {}, "summary": summary, "log": str(out / LOG)}


def _summary_rows(path: Path) -> list[dict]:
    """summary.txt's pipe table (tuning_space, num_experiments, best_metric_val, best_exp_name), "global" last."""
    lines = [line.strip().strip("|") for line in path.read_text().splitlines() if line.startswith("|")]
    header, rows = [c.strip() for c in lines[0].split("|")], lines[2:]
    table = [dict(zip(header, (c.strip() for c in row.split("|")))) for row in rows]
    return sorted(table, key=lambda row: row["tuning_space"] == "global")


def stop_report(out: Path, log: str, experiment: Path | None = None) -> str:
    """Where DeepSpeed's autotuner stopped (its first launch, or an experiment and its command) and why: the error
    that ended the failed process's ``log`` (its last: a traceback's cause comes before it)."""
    if experiment is not None:
        cmd = read_log(experiment / "cmd.txt").strip()
        where = f"its experiment {experiment.name} failed ({experiment / 'stderr.log'}); command: {cmd}"
    else:
        where = f"the launcher failed: {read_log(out / 'command.txt').strip()}"
    error = first_error("\n".join(reversed(log.splitlines())))
    report = f"DeepSpeed's autotuner chose no configuration: {where}\nerror: {error or '(none in the log)'}"
    if any(sign in log for sign in NO_HOST_REACH):
        report += ("\nwhy: DeepSpeed reaches a hostfile's hosts only through passwordless ssh and pdsh "
                   "(deepspeed/launcher/runner.py main(): the ssh check, then PDSHRunner), and "
                   "deepspeed/autotuning/scheduler.py run_experiment() relaunches every experiment as "
                   "`deepspeed --hostfile H --include ... --master_port P`, without --no_ssh_check, --master_addr or "
                   "--launcher. The local cluster's simulated nodes are reached through Slurm, not ssh: run without "
                   "a hostfile (nodes=None) here; on a GPU cluster give every node pdsh and passwordless ssh.")
    return report + f"\nfull log: {out / LOG}"


# -------------------------------------------------------------------------------- the script DeepSpeed launches
def _decode_config(value: str) -> dict:
    """``--deepspeed_config``: a .json file, or base64 JSON (the autotuner passes each experiment's config so)."""
    if value.endswith(".json"):
        return read_json(value)
    try:
        return json.loads(base64.urlsafe_b64decode(value))
    except ValueError:
        raise ValueError(f"--deepspeed_config {value[:60]}: neither a .json file nor base64 JSON") from None


def _experiment_dir(ds: dict) -> Path:
    """Where the autotuner wants this experiment's files: its metrics.json's (or model_info.json's) folder."""
    tuning = ds.get("autotuning", {})
    path = tuning.get("metric_path") or tuning.get("model_info_path")
    if not tuning.get("enabled") or not path:
        raise ValueError(f"{SCRIPT.name} runs DeepSpeed's autotuning experiments: start it with deepspeed "
                         "--autotuning tune (labs_lib.planner.deepspeed_autotune.run_deepspeed_autotuner)")
    return Path(path).parent


def main(argv: list[str] | None = None) -> None:
    """One rank of one autotuning experiment: the trainer, on the config and micro-batch DeepSpeed chose."""
    parser = argparse.ArgumentParser(prog=f"deepspeed {SCRIPT.name}", description=main.__doc__)
    parser.add_argument("--local_rank", type=int, help="set by DeepSpeed's launcher (LOCAL_RANK says the same)")
    parser.add_argument("--deepspeed_config", required=True, help="a DeepSpeed JSON config, or base64 JSON")
    args, trainer_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    ds = _decode_config(args.deepspeed_config)
    run = _experiment_dir(ds) / "run"
    from labs_lib.train.deepspeed import gpt

    run.mkdir(parents=True, exist_ok=True)
    config = run / f"ds_config_rank{os.environ.get('RANK', '0')}.json"  # one per rank: no two write one file
    write_json(config, ds)
    trainer_argv += ["--out", str(run), "--ds-config", str(config),
                     "--batch-size", str(ds["train_micro_batch_size_per_gpu"]),
                     "--grad-accum", str(ds.get("gradient_accumulation_steps", 1))]
    try:
        gpt.main(trainer_argv)
    except SystemExit as stop:  # the engine's exit() once it wrote the experiment's metrics (or model info)
        if stop.code not in (None, 0):
            raise


if __name__ == "__main__":
    from labs_lib.core.dist import exit_process

    main()
    exit_process()  # not the interpreter's teardown: leftover gloo threads can abort it
