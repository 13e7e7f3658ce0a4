"""The errors a user can cause without any server: no kubeconfig and no pod, or a server that
cannot be reached; each is NoClusterError, and the CLI leaves with exit code 4 and one line.
(The errors that need a server are shown against the real one in tests/e2e/test_sdk_errors.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune import foundation_model as fm

REPO = Path(__file__).resolve().parents[2]


def kubetune(kubeconfig: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *argv], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_is_no_cluster(tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": f"https://127.0.0.1:{closed_port()}"}}],
        "users": [{"name": "me", "user": {"token": "x"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "me"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(fm.NoClusterError) as raised:
        fm.list()
    assert "cannot reach the Kubernetes API server" in str(raised.value) and "'gone'" in str(raised.value)
    result = kubetune(kubeconfig, "get")
    assert result.returncode == 4 and "cannot reach" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_kubeconfig_and_no_pod_is_no_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "")
    with pytest.raises(fm.NoClusterError, match="no Kubernetes cluster configured"):
        fm.get("anything")
