"""Real-browser fixtures: a JupyterLab server on temporary notebook copies, driven by chromium.

- ``lab``: one JupyterLab per session (``.venv/bin/jupyter lab`` on a free 127.0.0.1 port with a
  random token), serving a temporary folder that holds copies of the committed notebooks (the
  committed files never get outputs). Settings, workspaces and runtime files live in that
  folder too. The server's whole process group (server + kernels) is terminated in teardown.
- ``browser``: Debian's chromium (``/usr/bin/chromium``) through Python playwright; never
  ``playwright install``.
- ``page``: a fresh page per test, 1400x1000.

Helpers for the tests (screenshots into ``artifacts/ui/``, notebook copies with injected
parameters) are in ``uihelpers.py``; the tests are marked ``ui``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
JUPYTER = ROOT / ".venv" / "bin" / "jupyter"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-gpu"]
STARTUP_TIMEOUT_S = 180

sys.path.insert(0, str(Path(__file__).parent))     # results_fixture, uihelpers: beside this file


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Lab settings that keep the page deterministic and offline: every cell attached to the DOM
# (no windowing), no news / update checks, no extension manager (it would query PyPI).
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"checkForUpdates": False,
                                                                       "fetchNews": "false"},
    "@jupyterlab/extensionmanager-extension/plugin.jupyterlab-settings": {"enabled": False},
}


@dataclass
class Lab:
    url: str
    token: str
    root: Path               # the folder JupyterLab serves (notebook copies live here)
    proc: subprocess.Popen
    log: Path

    def api(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}?token={self.token}", timeout=10) as r:
            return json.loads(r.read())

    def shutdown_kernels(self) -> None:
        """Shut down every kernel of the server (between tests: the machine is small)."""
        for k in self.api("/api/kernels"):
            req = urllib.request.Request(f"{self.url}/api/kernels/{k['id']}?token={self.token}", method="DELETE")
            try:
                urllib.request.urlopen(req, timeout=30).close()
            except OSError:
                pass

    def kernels_idle(self) -> bool:
        kernels = self.api("/api/kernels")
        return bool(kernels) and all(k.get("execution_state") == "idle" for k in kernels)

    def open_url(self, notebook: str) -> str:
        return f"{self.url}/lab/tree/{notebook}?token={self.token}&reset"


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (it and the kernels it started), then make sure."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    if not JUPYTER.exists():
        pytest.fail(f"{JUPYTER} not found: run `make setup` first")
    base = tmp_path_factory.mktemp("lab")
    served = base / "notebooks"
    served.mkdir()
    settings = base / "settings"
    for rel, data in SETTINGS.items():
        f = settings / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(data))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(base / "runtime"), "JUPYTER_CONFIG_DIR": str(base / "config")}
    log = base / "jupyterlab.log"
    cmd = [str(JUPYTER), "lab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
           f"--ServerApp.token={token}", "--allow-root", "--notebook-dir", str(served),
           "--ServerApp.port_retries=0", "--LabApp.news_url=", "--ServerApp.open_browser=False"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=served,
                                start_new_session=True)
    lab = Lab(url=f"http://127.0.0.1:{port}", token=token, root=served, proc=proc, log=log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                lab.api("/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab not ready after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield lab
    finally:
        _stop(proc)
        print(f"\nJupyterLab log: {log}")


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: run scripts/system_deps.sh (Debian chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()
