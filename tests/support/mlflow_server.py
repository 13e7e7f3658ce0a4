"""A real `mlflow server` process for tests: sqlite backend, proxied artifacts, a free local port.

Artifacts are served by the server itself (`--serve-artifacts`), as on a cluster where the pods
do not share a filesystem with the tracking server: clients upload and download over HTTP.

    with running_mlflow_server(tmp_path) as uri: ...      # anywhere
    def test_x(mlflow_server): ...                        # the session-scoped pytest fixture
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from tests.support.ports import free_port

STARTUP_DEADLINE_S = 90.0  # first start migrates the sqlite schema; slow on a busy 2-core box
STOP_DEADLINE_S = 10.0


def server_command(root: Path, port: int, python: str = sys.executable,
                   host: str = "127.0.0.1") -> list[str]:
    return [
        python, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
        "--host", host, "--port", str(port),
        "--workers", "1",
    ]


def is_healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_healthy(uri: str, process: subprocess.Popen, log_path: Path,
                       deadline_s: float = STARTUP_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{_tail(log_path)}")
        if is_healthy(uri):
            return
        time.sleep(0.2)
    raise TimeoutError(f"mlflow server at {uri} not healthy after {deadline_s:.0f}s:\n{_tail(log_path)}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (gunicorn forks workers), then SIGKILL if stuck."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running_mlflow_server(root: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Start `mlflow server` with its state under `root`, listening on `host` (an address pods
    reach, for a cluster on real nodes); yield its tracking URI; stop it."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://{host}:{port}"
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        # A session of its own: stop() signals the server and its workers, nothing else.
        process = subprocess.Popen(server_command(root, port, host=host), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_healthy(uri, process, log_path)
        yield uri
    finally:
        stop(process)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """The tracking URI of a real MLflow server shared by the session's tests."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri
