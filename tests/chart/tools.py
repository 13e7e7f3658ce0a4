"""The real tools the chart tests run: helm (from tests/cluster/binaries.py), the pinned Go tools
(tools/go-tool.sh builds each once into ~/.cache/kubetune), promtool, and the Kubernetes 1.35
schemas (tools/k8s_schemas.py). `render` is `helm template` of the chart with a values set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.cluster import binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
VALUES = Path(__file__).with_name("values")
VALUE_SETS = ["default", "all-features", "namespaced", "minimal"]


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)


@cache
def go_tool(name: str) -> Path:
    if shutil.which("go") is None:
        pytest.skip(f"building {name} needs Go (tools/go-tool.sh)")
    proc = run(["bash", REPO / "tools" / "go-tool.sh", name])
    if proc.returncode != 0:
        pytest.fail(f"tools/go-tool.sh {name} failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@cache
def helm() -> Path:
    return binaries.helm_path()


@cache
def promtool() -> Path:
    proc = run(["bash", REPO / "tools" / "prometheus.sh", "promtool"])
    if proc.returncode != 0:
        pytest.fail(f"tools/prometheus.sh: {proc.stderr.strip()}")
    return Path(proc.stdout.strip())


@cache
def schema_root() -> Path:
    proc = run([sys.executable, REPO / "tools" / "k8s_schemas.py"])
    if proc.returncode != 0:
        pytest.fail(f"tools/k8s_schemas.py failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip())


def values_args(value_set: str) -> list[str]:
    return [] if value_set == "default" else ["-f", str(VALUES / f"{value_set}.yaml")]


def render(value_set: str = "default", *extra: str, namespace: str = "kubetune-system") -> list[dict]:
    proc = run([helm(), "template", "kt", CHART, "-n", namespace, "--include-crds",
                *values_args(value_set), *extra], env={**os.environ, "HELM_CACHE_HOME": "/tmp/helm-cache"})
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def kubeconform(manifest: str) -> subprocess.CompletedProcess:
    location = (f"{schema_root()}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/"
                "{{ .ResourceKind }}{{ .KindSuffix }}.json")
    return run([go_tool("kubeconform"), "-strict", "-summary", "-kubernetes-version", "1.35.4",
                "-schema-location", location, "-"], input=manifest)
