"""A minimal Chrome DevTools Protocol client: headless Chromium driven over one page's websocket."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import websocket


class Browser:
    """``chromium --headless=new`` on a free debugging port; ``send`` a CDP command to its first page."""

    def __init__(self, executable: str, profile: Path, size: tuple[int, int] = (1400, 1000)):
        flags = ["--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run",
                 f"--window-size={size[0]},{size[1]}", "--disable-gpu", "--disable-dev-shm-usage"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
        self.process = subprocess.Popen([executable, *flags, "about:blank"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        self.next_id, self.ws = 0, None
        try:
            port = self._port(profile / "DevToolsActivePort")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                page = next(t for t in json.load(response) if t["type"] == "page")
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
            self.send("Emulation.setFocusEmulationEnabled", enabled=True)  # headless: the page always has focus
        except BaseException:
            self.close()
            raise

    def _port(self, path: Path, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.process.returncode}")
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.2)
        raise TimeoutError(f"chromium wrote no {path.name} within {timeout} s")

    def send(self, method: str, **params) -> dict:
        """One command; its result (events that arrive in between are dropped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = "", state: str = "null"):
        """Poll until the expression is truthy; its value. On timeout, the error shows the value of ``state``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.js(expression):
                return value
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout} s for {what or expression}; page state: {self.js(state)}")

    def click(self, selector: str, index: int = 0):
        """A real mouse click at the centre of the index-th element matching ``selector``."""
        x, y = self.wait_for(f"""(() => {{ const e = document.querySelectorAll({json.dumps(selector)})[{index}];
            if (!e) return null; e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""", what=f"{selector} #{index}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def shift_enter(self):
        for kind in ("rawKeyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, modifiers=8, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13)

    def screenshot(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        if self.ws is not None:
            try:
                self.send("Browser.close")
            except Exception:
                pass
            self.ws.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the renderer and zygote processes too
        except ProcessLookupError:
            pass
        self.process.wait()
