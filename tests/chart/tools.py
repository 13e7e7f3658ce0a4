"""The real tools the chart tests run: helm (from tests/cluster/binaries.py), the pinned Go tools
(tools/go-tool.sh builds each once into ~/.cache/kubetune), promtool, and the Kubernetes 1.35
schemas (tools/k8s_schemas.py). `render` is `helm template` of the chart with a values set."""

from __future__ import annotations

import copy
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


def render(value_set: str = "default", *extra: str) -> list[dict]:
    """`helm template` of the chart (CRDs included), as objects; each value set is rendered once."""
    return copy.deepcopy(_render(value_set, *extra))


@cache
def _render(value_set: str, *extra: str) -> list[dict]:
    proc = run([helm(), "template", "kt", CHART, "-n", "kubetune-system", "--include-crds",
                *values_args(value_set), *extra])
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def kubeconform(manifest: str) -> subprocess.CompletedProcess:
    location = (f"{schema_root()}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/"
                "{{ .ResourceKind }}{{ .KindSuffix }}.json")
    return run([go_tool("kubeconform"), "-strict", "-summary", "-kubernetes-version", "1.35.4",
                "-schema-location", location, "-"], input=manifest)
