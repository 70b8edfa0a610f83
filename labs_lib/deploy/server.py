"""Find, start and stop a real Triton Inference Server on 127.0.0.1, and drive its model repository API.

    install = find_server()                          # tritonserver on PATH, $TRITONSERVER, or the nvidia-pytriton wheel
    with TritonServer("build/deploy/demo/repository", load=["ensemble"]) as server:
        print(server.http_url, server.grpc_url, server.metrics_url)
        print(format_ready_table(server.ready_table()))
        server.unload("ensemble"); server.load("ensemble")
    binary, env = find_perf_analyzer()               # tritonclient's perf_analyzer and the libraries it links

Where the server comes from, in order: ``tritonserver`` on PATH (NVIDIA's container), the binary ``$TRITONSERVER``
names, else the server bundled in the ``nvidia-pytriton`` wheel, laid out once under the build folder as a normal
install (bin, backends with the python backend stub of this interpreter's Python, caches). The python backend's
stub embeds libpython and finds its packages through the first ``python3`` on PATH, so the server runs with this
interpreter's folder first on PATH: the models import torch and labs_lib from the same environment as the caller.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from labs_lib.core import paths
from labs_lib.core.dist import free_ports
from labs_lib.core.tables import format_table

__all__ = ["ServerInstall", "find_server", "find_perf_analyzer", "TritonServer", "ServerError", "free_ports",
           "first_error_line", "format_ready_table", "INSTALL_HINT"]

INSTALL_HINT = ("pip install -c constraints.txt -r requirements.txt (it brings nvidia-pytriton, whose wheel holds "
                "tritonserver), put tritonserver on PATH (NVIDIA's Triton container), or set TRITONSERVER to the "
                "binary")
PYTRITON = "nvidia-pytriton"


class ServerError(RuntimeError):
    """The server would not start, died, or refused a repository request; the message says what to do."""


@dataclass(frozen=True)
class ServerInstall:
    """A tritonserver binary and what it needs beside it."""

    binary: Path
    backend_dir: Path | None = None  # None: the server's own default (/opt/tritonserver/backends in the container)
    cache_dir: Path | None = None
    library_path: tuple[str, ...] = ()  # put first on LD_LIBRARY_PATH
    source: str = "PATH"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The server's environment: this interpreter's folder first on PATH (the python stub's ``python3``), the
        install's libraries first on LD_LIBRARY_PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]).rstrip(os.pathsep)
        if self.library_path:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*self.library_path, env.get("LD_LIBRARY_PATH", "")]).rstrip(
                os.pathsep)
        return env


def _beside(binary: Path, source: str) -> ServerInstall:
    """An installed server (<root>/bin/tritonserver): its backends and caches are where the server looks anyway."""
    root = binary.resolve().parent.parent
    backends, caches = root / "backends", root / "caches"
    return ServerInstall(binary, backends if backends.is_dir() else None, caches if caches.is_dir() else None,
                         source=source)


def find_server() -> ServerInstall:
    """The tritonserver to run: on PATH, else ``$TRITONSERVER``, else the nvidia-pytriton wheel's (laid out once)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return _beside(Path(on_path), "PATH")
    named = os.environ.get("TRITONSERVER")
    if named:
        binary = Path(named)
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise FileNotFoundError(f"TRITONSERVER={named} is not an executable file: point it at a tritonserver "
                                    "binary, or unset it to use the nvidia-pytriton wheel's")
        return _beside(binary, "$TRITONSERVER")
    return _lay_out_pytriton()


def _lay_out_pytriton() -> ServerInstall:
    """Copy the wheel's server into build/tritonserver/pytriton-<version>-py<X.Y>: bin, backends (with this Python's
    stub in backends/python, where the python backend looks for it) and caches. Done once; a finished layout is
    marked by a stamp file, and a half-copied one (an interrupted run) is replaced."""
    try:
        dist = importlib.metadata.distribution(PYTRITON)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"no tritonserver found: {INSTALL_HINT}") from None
    source = Path(dist.locate_file("pytriton/tritonserver"))
    libs = Path(dist.locate_file("nvidia_pytriton.libs"))
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not (source / "bin" / "tritonserver").exists():
        raise FileNotFoundError(f"{PYTRITON} {dist.version} at {source} has no bin/tritonserver: reinstall it "
                                f"(pip install --force-reinstall {PYTRITON}=={dist.version})")
    if not stub.exists():
        raise FileNotFoundError(f"{PYTRITON} {dist.version} has no python backend stub for Python {py}: run with a "
                                "Python it ships a stub for (3.8-3.13)")
    dest = paths.build_dir() / "tritonserver" / f"pytriton-{dist.version}-py{py}"
    stamp = dest / ".laid-out"
    if not stamp.exists():
        partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        for part in ("bin", "backends", "caches"):
            shutil.copytree(source / part, partial / part)
        shutil.copy2(stub, partial / "backends" / "python" / stub.name)
        (partial / ".laid-out").write_text(f"{PYTRITON} {dist.version}, stub of Python {py}\n")
        shutil.rmtree(dest, ignore_errors=True)  # an unfinished layout (no stamp) from an interrupted run
        try:
            partial.rename(dest)
        except OSError:  # another process laid it out meanwhile: theirs is as good
            shutil.rmtree(partial, ignore_errors=True)
    # The interpreter's LIBDIR first: the stub links libpython3.X, and a system copy of another build fails it.
    return ServerInstall(dest / "bin" / "tritonserver", dest / "backends", dest / "caches",
                         (sysconfig.get_config_var("LIBDIR") or "", str(libs)), f"{PYTRITON} {dist.version}")


def find_perf_analyzer() -> tuple[Path, dict[str, str]]:
    """(tritonclient's perf_analyzer, the environment to run it in). The wheel's binary links libb64.so.0d and
    libcudart.so.12, which the nvidia-pytriton wheel carries under hashed names: links with the plain names are
    made once under the build folder and put on LD_LIBRARY_PATH."""
    beside = Path(sys.executable).parent / "perf_analyzer"  # where pip puts the wheel's data/bin
    binary = beside if beside.exists() else Path(shutil.which("perf_analyzer") or beside)
    if not binary.exists():
        raise FileNotFoundError("no perf_analyzer: pip install -c constraints.txt -r requirements.txt (tritonclient's "
                                "wheel carries it), or use NVIDIA's Triton SDK container")
    env = dict(os.environ)
    try:
        libs = Path(importlib.metadata.distribution(PYTRITON).locate_file("nvidia_pytriton.libs"))
    except importlib.metadata.PackageNotFoundError:
        return binary, env  # a perf_analyzer with its libraries installed (the SDK container)
    links = paths.build_dir() / "tritonserver" / "perf_analyzer_libs"
    links.mkdir(parents=True, exist_ok=True)
    for name, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        found = sorted(libs.glob(pattern))
        if found and not (links / name).exists():
            with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                (links / name).symlink_to(found[0])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(links), str(libs), env.get("LD_LIBRARY_PATH", "")]).rstrip(
        os.pathsep)
    return binary, env


_ERROR_LINE = re.compile(r"^E\d{4} |\berror\b|failed to", re.IGNORECASE)
# What the server logs as errors on every machine without a GPU, and then carries on: never the reason it stopped.
_NO_GPU = re.compile(r"CudaDriverHelper|CUDA driver version|NVML|DCGM|pinned (system )?memory|"
                     r"unable to create stream", re.IGNORECASE)


def first_error_line(log: str) -> str | None:
    """The first line of a tritonserver log that reports an error (glog's ``E`` lines first), or None. The errors
    every GPU-less machine logs (CUDA, NVML, DCGM, pinned memory) are skipped: they are not why a start failed."""
    # A python model's traceback comes inside one log line as literal \n's: the first part says what went wrong.
    lines = [line.split("\\n")[0].strip() for line in log.splitlines() if not _NO_GPU.search(line)]
    for pattern in (re.compile(r"^E\d{4} "), _ERROR_LINE):
        for line in lines:
            if pattern.search(line):
                return line
    return None


def format_ready_table(rows: list[dict]) -> str:
    """The repository index as a table: model, version, state (READY, UNAVAILABLE, ...), reason."""
    return format_table([{"model": r.get("name", ""), "version": r.get("version", ""), "state": r.get("state", ""),
                          "reason": r.get("reason", "")} for r in rows])


@dataclass
class TritonServer:
    """A tritonserver on 127.0.0.1 serving ``repository`` with explicit model control, as a context manager.

    Ports are free ones unless given; its log (stdout and stderr) goes to ``log_path``; ``start`` waits until the
    server is ready (the models of ``load`` loaded) or raises ServerError quoting the log's first error line;
    ``stop`` asks it to exit (SIGTERM), then kills what is left of its process group."""

    repository: str | Path
    load_models: list[str] = field(default_factory=list)
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    log_path: str | Path | None = None
    startup_timeout: float = 120.0
    install: ServerInstall | None = None
    env: dict[str, str] | None = None
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.repository = Path(self.repository).resolve()
        self.process: subprocess.Popen | None = None
        if self.log_path is None:
            self.log_path = self.repository.parent / f"{self.repository.name}-tritonserver.log"
        self.log_path = Path(self.log_path)

    # ------------------------------------------------------------------------------------------------ addresses
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        install = self.install
        cmd = [str(install.binary), f"--model-repository={self.repository}", "--model-control-mode=explicit",
               "--pinned-memory-pool-byte-size=0",  # no CUDA host memory to pin on a CPU machine
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
               "--exit-timeout-secs=10"]
        if install.backend_dir:
            cmd.append(f"--backend-directory={install.backend_dir}")
        if install.cache_dir:
            cmd.append(f"--cache-directory={install.cache_dir}")
        cmd += [f"--load-model={m}" for m in self.load_models]
        return cmd + list(self.extra_args)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> TritonServer:
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} does not exist: render one first "
                                    "(labs_lib.deploy.repository.render_repository)")
        self.install = self.install or find_server()
        wanted = [self.http_port, self.grpc_port, self.metrics_port]
        spare = iter(free_ports(wanted.count(None)))
        self.http_port, self.grpc_port, self.metrics_port = [p if p is not None else next(spare) for p in wanted]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Its own session: stop() can end the server and its backend stubs together, and a Ctrl-C meant for
            # the caller does not reach it first.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.install.env(self.env),
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(self._failure(f"tritonserver exited with code {self.process.returncode} while "
                                                "starting"))
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(self._failure(f"tritonserver was not ready after {self.startup_timeout:.0f} s (raise "
                                        "startup_timeout on a slow machine)"))

    def _failure(self, what: str) -> str:
        log = self.log_text()
        line = first_error_line(log)
        tail = "\n".join(log.splitlines()[-15:])
        return (f"{what}; first error: {line or '(none in the log)'}\nlog {self.log_path}, last lines:\n{tail}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the server unloads its models and exits), then SIGKILL to its process group if it lingers."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the group is the server's own: stubs it left behind
        process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # ------------------------------------------------------------------------------------------------ HTTP API
    def _request(self, method: str, route: str, body: dict | None = None, timeout: float = 60.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.http_url}{route}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            with contextlib.suppress(ValueError):
                detail = json.loads(detail).get("error", detail)
            raise ServerError(f"{method} {route}: HTTP {e.code}: {detail}") from None
        return json.loads(text) if text.strip() else None

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def load(self, model: str) -> None:
        """Load (or reload) ``model`` from the repository; ServerError with the server's reason if it fails."""
        try:
            self._request("POST", f"/v2/repository/models/{model}/load", timeout=self.startup_timeout)
        except ServerError as e:
            raise ServerError(f"{e} (log: {self.log_path})") from None

    def unload(self, model: str, dependents: bool = False) -> None:
        """Unload ``model`` (and, with ``dependents``, the models an ensemble uses)."""
        body = {"parameters": {"unload_dependents": True}} if dependents else None
        self._request("POST", f"/v2/repository/models/{model}/unload", body)

    def ready_table(self) -> list[dict]:
        """The repository index: one dict (name, version, state, reason) per model version the server knows."""
        return self._request("POST", "/v2/repository/index", {}) or []

    def wait_model_state(self, model: str, state: str, timeout: float = 30.0) -> None:
        """Wait until ``model``'s state in the index is ``state`` (unload returns before the model is gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {r.get("state") for r in self.ready_table() if r.get("name") == model}
            if state in states or (state == "UNAVAILABLE" and not states):
                return
            time.sleep(0.1)
        raise ServerError(f"{model} did not become {state} within {timeout:.0f} s: see {self.log_path}")
