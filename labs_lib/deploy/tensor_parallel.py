"""Tensor-parallel serving: the ``gpt`` model's instance drives ``tp`` worker processes that hold the shards.

This is how a model too large for one GPU is deployed (TensorRT-LLM's orchestrator mode): the Triton instance
parses and batches requests, the workers, one per GPU (gloo over CPU cores here, NCCL on GPUs), each hold 1/tp of
every split weight (:func:`labs_lib.parallel.tensor_parallel.apply_tensor_parallel`: heads and MLP columns, the
vocabulary) and run the same KV-cached generation in lockstep; every collective leaves all of them with the same
logits, so they pick the same tokens, and rank 0 reports them::

    workers = TensorParallelWorkers("build/runs/demo", tp=2)
    workers.weight_bytes                                        # [bytes held by rank 0, by rank 1]
    rows = workers.generate([[5, 6, 7]], Decoding(max_new_tokens=8, temperature=0))
    workers.close()

    python -m labs_lib.deploy.tensor_parallel --checkpoint RUN --rank R --world-size T --port P   # one worker

The workers talk to their instance in JSON lines over stdin / stdout (a request in; rank 0's tokens as they come
when asked, then each rank's result out); their stderr is the instance's, so it lands in the server's log. A
worker exits when its stdin closes: the instance (or the whole server) going away never leaves workers behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from labs_lib.core import checkpoint
from labs_lib.core.config import GPTConfig
from labs_lib.inference.generate import Decoding, ends_with_any, generate_ids, load_trained

__all__ = ["TensorParallelWorkers", "shard_for_serving", "finished_rule", "worker_main"]

COLLECTIVE_TIMEOUT_S = 120  # a rank stuck in a collective (its peer died) gives up after this


def finished_rule(stop: tuple[tuple[int, ...], ...], on_token: Callable[[list[int]], None] | None = None):
    """generate_ids' ``finished_when``: report each new token (streaming), end at the first stop sequence."""
    if not stop and on_token is None:
        return None

    def finished(new: list[int]) -> bool:
        if on_token is not None:
            on_token(new)
        return ends_with_any(new, stop)

    return finished


def _tuples(value):
    """JSON's lists back to the tuples Decoding holds (word lists are tuples of tuples)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class TensorParallelWorkers:
    """``tp`` worker processes serving the checkpoint ``checkpoint`` (a run or step folder) tensor-parallel."""

    def __init__(self, checkpoint_path: str | Path, tp: int, threads: int = 0, startup_timeout: float = 300):
        from labs_lib.deploy.server import free_ports
        from labs_lib.parallel.tensor_parallel import check_tensor_parallel

        ckpt, _ = checkpoint.resolve_run(checkpoint_path)
        self.config = GPTConfig(**checkpoint.load_meta(ckpt)["model"])
        check_tensor_parallel(self.config, tp)  # before any process starts: the fix is in the message
        self.tp = tp
        threads = threads or max(1, (len(os.sched_getaffinity(0)) // tp))
        python = _python()
        port = free_ports(1)[0]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self._lock = threading.Lock()
        self._procs = [subprocess.Popen(
            [python, "-m", "labs_lib.deploy.tensor_parallel", "--checkpoint", str(ckpt), "--rank", str(rank),
             "--world-size", str(tp), "--port", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for rank in range(tp)]
        timer = threading.Timer(startup_timeout, self.close)  # a worker that never says ready is stopped
        timer.start()
        try:
            ready = [self._read(rank) for rank in range(tp)]
        except Exception:
            self.close()
            raise
        finally:
            timer.cancel()
        self.weight_bytes = [r["weight_bytes"] for r in ready]

    def _read(self, rank: int) -> dict:
        line = self._procs[rank].stdout.readline()
        if not line:
            code = self._procs[rank].poll()
            raise RuntimeError(f"tensor-parallel worker {rank} exited (code {code}): its error is in the server's "
                               "log; the gpt model must be reloaded")
        message = json.loads(line)
        if "error" in message:
            raise ValueError(message["error"])
        return message

    def generate(self, prompts: list[list[int]], d: Decoding, stop: tuple[tuple[int, ...], ...] = (),
                 on_token: Callable[[list[int]], None] | None = None) -> list[list[int]]:
        """generate_ids' rows for ``prompts``, computed by the workers; ``on_token(new tokens so far)`` after each
        token of a single prompt (streaming). An error on any rank raises it here."""
        request = json.dumps({"prompts": prompts, "decoding": dataclasses.asdict(d), "stop": stop,
                              "stream": on_token is not None}) + "\n"
        with self._lock:  # one request at a time: the workers run it in lockstep
            for proc in self._procs:
                proc.stdin.write(request)
                proc.stdin.flush()
            results, error = [], None
            for rank in range(self.tp):
                try:
                    while "new" in (message := self._read(rank)):  # only rank 0 streams
                        on_token(message["new"])
                    results.append(message)
                except ValueError as e:  # this rank's error; read the others' answers so the next request is clean
                    error = error or e
        if error is not None:
            raise error
        return results[0]["rows"]

    def close(self) -> None:
        """Stop the workers: their stdin closes, they leave the process group and exit."""
        for proc in self._procs:
            with _quiet():
                proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class _quiet:
    """Ignore a broken pipe: closing the stdin of a worker that has died already."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


def _python() -> str:
    """The interpreter to run workers with. Inside Triton's python backend ``sys.executable`` is the backend's stub,
    not Python; the server runs with the models' interpreter first on PATH."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    found = shutil.which("python3")
    if found is None:
        raise FileNotFoundError("no python3 on PATH to run the tensor-parallel workers: start the server with the "
                                "environment's bin folder first on PATH (labs_lib.deploy.server does)")
    return found


# ---------------------------------------------------------------------------------------------------- the worker

def shard_for_serving(path: str | Path, device: torch.device):
    """This rank's tensor-parallel shard of a trained GPT, in eval mode, whose lm_head gathers the full logits
    (sampling needs the whole vocabulary); the full weights are dropped once sliced. Needs the process group."""
    from labs_lib.parallel.tensor_parallel import apply_tensor_parallel

    model, tokenizer, _ = load_trained(path)
    model = apply_tensor_parallel(model)
    model.lm_head.gather_output = True
    return model.to(device).eval(), tokenizer


def _serve(model, rank: int) -> None:
    from labs_lib.measure.memory import storage_bytes

    weight_bytes, _ = storage_bytes([*model.parameters(), *model.buffers()])
    _send({"ready": True, "rank": rank, "weight_bytes": weight_bytes})
    for line in sys.stdin:  # one request per line, until the instance closes stdin
        request = json.loads(line)
        d = Decoding(**{k: _tuples(v) for k, v in request["decoding"].items()})
        report = (lambda new: _send({"new": new})) if request["stream"] and rank == 0 else None
        try:
            with torch.no_grad():
                rows = generate_ids(model, request["prompts"], d, finished_rule(_tuples(request["stop"]), report))
        except ValueError as e:  # a refused request: every rank refuses it alike, before any collective
            _send({"error": str(e)})
            continue
        _send({"rows": rows} if rank == 0 else {"done": True})


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def worker_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m labs_lib.deploy.tensor_parallel",
                                description="One tensor-parallel serving worker (started by TensorParallelWorkers).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world_size), LOCAL_RANK=str(args.rank),
                      LOCAL_WORLD_SIZE=str(args.world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    from labs_lib.core.dist import cleanup, init_distributed

    try:
        info = init_distributed(timeout_s=COLLECTIVE_TIMEOUT_S)
        model, _ = shard_for_serving(args.checkpoint, info.device)
    except Exception as e:  # say why on stdout (the instance raises it) and in the log
        _send({"error": f"tensor-parallel worker {args.rank} could not start: {type(e).__name__}: {e}"})
        raise
    _serve(model, args.rank)
    cleanup()


if __name__ == "__main__":
    worker_main(sys.argv[1:])
