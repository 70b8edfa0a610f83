"""A learner's first minutes, in a real browser: `make lab` serves JupyterLab behind its token; headless Chromium
opens lab 00, runs its first code cells and sees their output, with no traceback; without the token the server
refuses (403 from the API, the login page instead of the lab). Screenshot: build/browser/lab00.png.

The server gets its own JupyterLab settings and workspaces (a config folder on JUPYTER_CONFIG_PATH) with autosave
off, so the test neither writes outputs into notebooks/ nor changes the tabs a learner's `make lab` restores."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cdp import Browser
from multiproc import free_port

from labs_lib.core import paths

from conftest import REPO

NOTEBOOK = "00_welcome_environment.ipynb"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def get(url: str, token: str | None = None) -> tuple[int, str, bytes]:
    """Status, Location header and body, redirects not followed."""
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
            return response.status, response.headers.get("Location", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location", ""), b""


def lab_config(folder: Path) -> Path:
    """A Jupyter config folder: this server's own user settings (no autosave, no news) and workspaces."""
    settings = folder / "settings"
    for plugin, values in {"docmanager-extension/plugin": {"autosave": False},
                           "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
        (settings / "@jupyterlab" / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings").write_text(json.dumps(values))
    lab = {"LabApp": {"user_settings_dir": str(settings), "workspaces_dir": str(folder / "workspaces")}}
    (folder / "jupyter_server_config.json").write_text(json.dumps(lab))
    return folder


def running_kernels(base: str, token: str) -> list[dict]:
    """The server's kernels; none while it cannot say."""
    try:
        status, _, body = get(f"{base}/api/kernels", token)
    except OSError:
        return []
    return json.loads(body) if status == 200 else []


def kernel_processes(kernel_ids: list[str]) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(f"kernel-{k}.json" in text for k in kernel_ids):
            pids.append(int(cmdline.parent.name))
    return pids


CELLS = "[...document.querySelectorAll('.jp-Notebook .jp-CodeCell')]"
PROMPTS = f"{CELLS}.slice(0, 2).map(c => c.querySelector('.jp-InputPrompt').textContent.trim())"
STATUS_BAR = "[...document.querySelectorAll('.jp-StatusBar-TextItem')].map(e => e.textContent.trim())"
OUTPUTS = "[...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')]"
STATE = f"""JSON.stringify({{prompts: {PROMPTS},
    active: document.querySelector('.jp-Notebook .jp-mod-active')?.className,
    focus: document.activeElement?.className,
    kernel: document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status, status: {STATUS_BAR}}})"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lab00_runs_in_a_browser_behind_the_token(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must have Chromium for the browser test (.ci/run installs the apt package chromium)")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")

    shots = paths.build_dir() / "browser"
    (shots / "lab00-failed.png").unlink(missing_ok=True)
    port, token = free_port(), os.urandom(24).hex()
    base, log_path = f"http://127.0.0.1:{port}", tmp_path / "lab.log"
    env = dict(os.environ, JUPYTER_PORT=str(port), JUPYTER_TOKEN=token,
               JUPYTER_CONFIG_PATH=os.pathsep.join(filter(None, [str(lab_config(tmp_path / "jupyter")),
                                                                  os.environ.get("JUPYTER_CONFIG_PATH")])))
    log = open(log_path, "w")
    server = subprocess.Popen(["make", "-s", "lab"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    browser, kernels = None, []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, log_path.read_text()
            try:
                if get(f"{base}/api/status", token)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 180 s:\n" + log_path.read_text())

        # Without the token: the API refuses, /lab sends to the login page. With it: served.
        assert get(f"{base}/api/contents")[0] == 403
        assert get(f"{base}/api/kernels")[0] == 403
        status, location, _ = get(f"{base}/lab")
        assert status == 302 and location.startswith("/login"), (status, location)
        assert get(f"{base}/lab", token)[0] == 200

        browser = Browser(chromium, tmp_path / "chromium")
        browser.send("Page.navigate", url=f"{base}/lab")
        browser.wait_for("location.pathname === '/login' && !!document.querySelector('input[type=password]')",
                         what="the login page")
        assert not browser.js("!!document.querySelector('.jp-Notebook')")

        browser.send("Page.navigate", url=f"{base}/lab/tree/{NOTEBOOK}?token={token}")
        title = browser.wait_for("document.querySelector('.jp-Notebook .jp-MarkdownCell h1')?.textContent",
                                 timeout=90, what="lab 00's title in the notebook")
        assert title.startswith("Lab 00"), title
        # A cell run before the page has connected to its kernel is dropped (the toolbar says idle before then):
        # wait until the server sees the notebook's kernel idle with the page connected.
        # (While a kernel starts, listing kernels can fail with a 500: jupyter_server's last_activity is unset.)
        deadline = time.monotonic() + 90
        while not (kernels := [k["id"] for k in running_kernels(base, token)
                               if k["connections"] and k["execution_state"] == "idle"]):
            assert time.monotonic() < deadline, f"no connected idle kernel within 90 s; page state: {browser.js(STATE)}"
            time.sleep(0.5)
        assert kernel_processes(kernels), "the kernel's process should be found by its connection file"

        # Click a code cell's prompt (selects it, command mode), Shift+Enter: it runs. The first two code cells.
        for cell in range(2):
            browser.click(".jp-Notebook .jp-CodeCell .jp-InputPrompt", cell)
            browser.shift_enter()
            browser.wait_for(f"{PROMPTS}[{cell}] === '[{cell + 1}]:'", timeout=90, state=STATE,
                             what=f"code cell {cell + 1} to run")

        first = browser.js(f"{CELLS}[0].querySelector('.jp-OutputArea').innerText")
        assert re.search(r"python \d+\.\d+.*torch", first), first  # the environment printout
        outputs = browser.js(f"{OUTPUTS}.map(o => [o.dataset.mimeType || '', o.innerText])")
        assert any(text.strip() for _, text in outputs), outputs
        errors = [text for mime, text in outputs if "Traceback" in text or mime == "application/vnd.jupyter.error"]
        assert not errors, errors

        browser.js(f"{CELLS}[0].querySelector('.jp-OutputArea').scrollIntoView({{block: 'center'}})")
        time.sleep(0.5)
        browser.screenshot(shots / "lab00.png")
        assert (shots / "lab00.png").stat().st_size > 10_000
    except BaseException:
        if browser is not None:
            try:
                browser.screenshot(shots / "lab00-failed.png")
            except Exception as e:  # the browser is gone: the original error matters more
                print(f"no failure screenshot: {e}")
        raise
    finally:
        if browser is not None:
            browser.close()
        if not kernels and server.poll() is None:  # failed early: still find the kernels to check they stop
            kernels = [k["id"] for k in running_kernels(base, token)]
        os.killpg(server.pid, signal.SIGTERM)  # the server shuts its kernels down on the way out
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        deadline = time.monotonic() + 20
        while (left := kernel_processes(kernels)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
    assert not left, f"kernel processes outlived the server: {left}"
