"""`make lab` serves JupyterLab on 127.0.0.1, behind a token, opened at notebooks/."""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from multiproc import free_port

from conftest import REPO


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@pytest.mark.slow
def test_make_lab_serves_jupyterlab_with_a_token(tmp_path):
    port, token = free_port(), "labs-test-token-0123456789"
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(["make", "-s", "lab"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, JUPYTER_PORT=str(port), JUPYTER_TOKEN=token),
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "lab.log").read_text()
            try:
                status, _ = get(f"{base}/api/status", token)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail("JupyterLab did not answer within 180 s:\n" + (tmp_path / "lab.log").read_text())

        assert get(f"{base}/api/contents")[0] == 403, "the server must refuse requests without the token"
        status, body = get(f"{base}/api/contents", token)
        assert status == 200
        names = {item["name"] for item in json.loads(body)["content"]}
        assert "01_data_parallel_gpt.ipynb" in names, names  # the root is notebooks/
        assert f"127.0.0.1:{port}/lab?token={token}" in (tmp_path / "lab.log").read_text()
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if listening.strip():  # ss is there: only the loopback address listens
            assert all("127.0.0.1:" in line for line in listening.splitlines()), listening
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
