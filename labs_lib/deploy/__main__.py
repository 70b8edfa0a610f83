"""Serve a trained run with Triton until interrupted; or prepare it for TensorRT-LLM in NVIDIA's container.

    python -m labs_lib.deploy serve --checkpoint RUN [--repository OUT] [--http-port P] [--grpc-port Q]
                                    [--metrics-port M] [--tp T]
    python -m labs_lib.deploy trtllm --checkpoint RUN --workdir DIR [--tp T] [--pp P] [--run-build]

serve: renders the model repository (default build/deploy/<run>/repository), starts tritonserver on 127.0.0.1 with
the four models loaded, prints its addresses and the READY table, and serves until Ctrl-C (or SIGTERM).
trtllm: prints the commands that build the run's TensorRT engine for T x P GPUs into DIR/engine (and runs them with
--run-build, where TensorRT-LLM is installed), renders DIR/repository with the tensorrt_llm model on that engine,
checked field by field, and prints the server's launch command (docs/tensorrt-llm.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from labs_lib.deploy.repository import MODELS, render_repository
from labs_lib.deploy.server import ServerError, TritonServer, format_ready_table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labs_lib.deploy", description="Serve a trained run with Triton.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="render the repository, start tritonserver, serve until Ctrl-C")
    serve.add_argument("--checkpoint", required=True, help="run folder or checkpoints/step_N folder")
    serve.add_argument("--repository", default=None, help="where to render the model repository "
                                                          "(default build/deploy/<run>/repository)")
    serve.add_argument("--http-port", type=int, default=None, help="default: a free port")
    serve.add_argument("--grpc-port", type=int, default=None, help="default: a free port")
    serve.add_argument("--metrics-port", type=int, default=None, help="default: a free port")
    serve.add_argument("--tp", type=int, default=1, help="tensor-parallel size: the gpt model runs in this many "
                                                         "worker processes, each holding 1/T of the weights")
    trt = sub.add_parser("trtllm", help="TensorRT-LLM: the engine's build commands and the checked repository")
    trt.add_argument("--checkpoint", required=True, help="run folder or checkpoints/step_N folder")
    trt.add_argument("--workdir", required=True, help="hf/, checkpoint/, engine/ and repository/ go here")
    trt.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (1)")
    trt.add_argument("--pp", type=int, default=1, help="pipeline-parallel GPUs (1)")
    trt.add_argument("--max-batch-size", type=int, default=8)
    trt.add_argument("--run-build", action="store_true", help="run the commands too (needs TensorRT-LLM)")
    return p


def prepare_trtllm(args) -> None:
    import shlex
    import subprocess
    from pathlib import Path

    from labs_lib.deploy import trtllm

    work = Path(args.workdir)
    try:
        commands = trtllm.build_commands(args.checkpoint, work, tp=args.tp, pp=args.pp,
                                         max_batch_size=args.max_batch_size)
        repository = render_repository(args.checkpoint, work / "repository", engine="tensorrt_llm",
                                       engine_dir=work / "engine", max_batch_size=args.max_batch_size,
                                       batching_strategy="inflight_fused_batching")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print("# build the engine:\n" + "\n".join(shlex.join(c) for c in commands))
    print(f"# the repository (checked: every field the tensorrtllm backend reads): {repository}")
    print("# serve it:\n" + shlex.join(trtllm.launch_command(repository, world_size=args.tp * args.pp)))
    if args.run_build:
        ok, why = trtllm.available()
        if not ok:
            raise SystemExit(f"error: cannot build here: {why}")
        for command in commands:
            if subprocess.run(command).returncode != 0:
                raise SystemExit(f"error: {shlex.join(command)} failed (its output is above)")


def _stop(signum, frame):
    raise KeyboardInterrupt  # leave through the with block: the server is stopped on the way out


def serve(args) -> None:
    try:
        repository = render_repository(args.checkpoint, args.repository, tp=args.tp)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"repository {repository}", flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts background jobs with it ignored
        signal.signal(signum, _stop)
    server = TritonServer(repository, list(MODELS), args.http_port, args.grpc_port, args.metrics_port)
    try:
        with server:
            print(f"HTTP     {server.http_url}\ngRPC     {server.grpc_url}\nmetrics  {server.metrics_url}\n"
                  f"log      {server.log_path}\n\n{format_ready_table(server.ready_table())}\n\n"
                  "serving; Ctrl-C stops the server", flush=True)
            while server.running:
                time.sleep(0.5)
            raise SystemExit(f"error: tritonserver exited on its own (code {server.process.returncode}); "
                             f"see {server.log_path}")
    except KeyboardInterrupt:
        print("stopped", flush=True)
    except (ServerError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        serve(args)
    elif args.command == "trtllm":
        prepare_trtllm(args)


if __name__ == "__main__":
    main(sys.argv[1:])
