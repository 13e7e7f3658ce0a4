"""Where the e2e tests run, and how they put inputs where the training pods can read them.

Locally (the control plane built from Go modules, the node agent playing kubelet) a pod is a
process of this machine: the "trainer image" is this interpreter and the storage root is a folder.
On real kubelets of this machine (KUBETUNE_E2E_NODE=kubelet) the pods run the trainer image built
here, on a local PersistentVolume per namespace, reporting to an MLflow server of this machine.
Against a real cluster (KUBETUNE_E2E_KUBECONFIG) the pods run the trainer image named by
KUBETUNE_E2E_TRAINER_IMAGE, the storage root is a PVC in each test namespace (its class from
KUBETUNE_E2E_STORAGE_CLASS, ReadWriteMany where KUBETUNE_E2E_STORAGE_ACCESS_MODE says so, which
multi-node runs on several nodes need), and MLflow is the server at KUBETUNE_E2E_MLFLOW_URI, which
the pods and this machine both reach. On real kubelets of this machine the operator is a pod of
its image, installed by the Helm chart with `chart_values`; elsewhere it runs as a process of this
machine under its own ServiceAccount.

In both places the inputs (the tiny model built by this process, the example data) travel in a
ConfigMap and are written to the storage by a Job of the trainer image in the test's namespace,
and files the runs wrote are read back by another Job: the same tests run in both places, and the
staging itself is exercised by every local run.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune.manifests import RUN_AS_USER
from kubetune.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
SEED_SCRIPT = Path(__file__).with_name("seed.py")
INPUT_FILES = {  # name under <inputs>/data → file in the repo
    "ift.jsonl": REPO / "examples" / "data" / "ift.jsonl",
    "chat.jsonl": REPO / "examples" / "data" / "chat.jsonl",
    "ift_broken.jsonl": REPO / "tests" / "trainer" / "data" / "broken" / "ift_broken.jsonl",
    **{f"cpt/{path.relative_to(REPO / 'examples' / 'data' / 'cpt')}": path
       for path in sorted((REPO / "examples" / "data" / "cpt").rglob("*")) if path.is_file()},
}
LONG_DATA_COPIES = 60  # ift.jsonl 60 times: ~150 batches, a few seconds, per epoch
SEED_MOUNT, SCRATCH, INPUTS_DIR = "/seed", "/scratch", "e2e-inputs"
STORAGE_CLAIM, STORAGE_MOUNT = "kubetune-e2e", OperatorSettings().storage_mount_path
JOB_TIMEOUT = 300
# The e2e operator looks at a run every second and reads live checkpoints as often: the tests wait on them.
E2E_INTERVALS = {"KUBETUNE_RECONCILE_INTERVAL": "1", "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "1"}

ENV_IMAGE, ENV_MLFLOW = "KUBETUNE_E2E_TRAINER_IMAGE", "KUBETUNE_E2E_MLFLOW_URI"
ENV_STORAGE_CLASS, ENV_ACCESS_MODE = "KUBETUNE_E2E_STORAGE_CLASS", "KUBETUNE_E2E_STORAGE_ACCESS_MODE"


class SiteUnavailable(Exception):
    """A real cluster was named without what its pods need; the message says what is missing."""


@dataclass(frozen=True)
class Site:
    trainer_image: str
    python: tuple[str, ...]          # how a pod starts Python
    torchrun: tuple[str, ...]
    tracking_uri: str
    storage_folder: str | None = None  # locally: the storage root, a folder every pod sees
    storage_class: str | None = None   # on a real cluster: the PVC's class (None: the default)
    access_mode: str = "ReadWriteOnce"
    pull_policy: str = "IfNotPresent"  # Never where the images are built on the nodes' machine
    # This machine's GPUs are a stand-in `nvidia.com/gpu` with no CUDA behind it: GPU runs train
    # on CPU. A real cluster's are real.
    cpu_fallback: bool = False
    # Real nodes of this machine: (namespace, claim) → the PersistentVolume bound to that claim.
    volume_for: Callable[[str, str], dict] | None = field(default=None, compare=False)

    @property
    def storage_root(self) -> str:
        """The storage root as pods see it."""
        return self.storage_folder or STORAGE_MOUNT

    def operator_env(self) -> dict[str, str]:
        """The operator settings (KUBETUNE_*) that point it at this site."""
        env = {
            "KUBETUNE_TRAINER_IMAGE": self.trainer_image,
            "KUBETUNE_TRAINER_COMMAND": json.dumps([*self.python, "-m", "kubetune_trainer"]),
            "KUBETUNE_TORCHRUN_COMMAND": json.dumps(list(self.torchrun)),
            "KUBETUNE_MLFLOW_TRACKING_URI": self.tracking_uri,
            "KUBETUNE_CPU_FALLBACK": "true" if self.cpu_fallback else "false",
            "KUBETUNE_IMAGE_PULL_POLICY": self.pull_policy,
        }
        if self.storage_folder:
            return {**env, "KUBETUNE_STORAGE_URI": self.storage_folder, "KUBETUNE_STORAGE_CLAIM_NAME": ""}
        return {**env, "KUBETUNE_STORAGE_URI": "", "KUBETUNE_STORAGE_CLAIM_NAME": STORAGE_CLAIM}


def local_site(storage_folder: Path, tracking_uri: str) -> Site:
    # The node agent runs this interpreter whatever the image; the name is the operator's default.
    return Site(trainer_image=OperatorSettings().trainer_image, python=(sys.executable,),
                torchrun=(sys.executable, "-m", "torch.distributed.run"),
                tracking_uri=tracking_uri, storage_folder=str(storage_folder), cpu_fallback=True)


def kubelet_site(trainer_image: str, tracking_uri: str, storage_class: str,
                 volume_for: Callable[[str, str], dict]) -> Site:
    """Real kubelets of this machine (tests/cluster/kubelet_cluster.py): the trainer image built
    here, a local PersistentVolume per namespace shared by both nodes, MLflow on an address of
    this machine that pods reach."""
    return Site(trainer_image=trainer_image, python=("python",), torchrun=("torchrun",),
                tracking_uri=tracking_uri, storage_class=storage_class, access_mode="ReadWriteMany",
                volume_for=volume_for, cpu_fallback=True, pull_policy="Never")


def real_site(environ: Mapping[str, str]) -> Site:
    missing = [name for name in (ENV_IMAGE, ENV_MLFLOW) if not environ.get(name)]
    if missing:
        raise SiteUnavailable(
            f"against a real cluster the e2e runs need {' and '.join(missing)}: the trainer image "
            "(docker build -f trainer-image/Dockerfile .) and an MLflow server that the pods and "
            "this machine both reach")
    mode = environ.get(ENV_ACCESS_MODE) or "ReadWriteOnce"
    if mode not in ("ReadWriteOnce", "ReadWriteMany"):
        raise SiteUnavailable(f"{ENV_ACCESS_MODE} is {mode!r}: ReadWriteOnce or ReadWriteMany")
    return Site(trainer_image=environ[ENV_IMAGE], python=("python",),
                torchrun=("torchrun",), tracking_uri=environ[ENV_MLFLOW],
                storage_class=environ.get(ENV_STORAGE_CLASS) or None, access_mode=mode)


# --- the operator as the Helm chart installs it -------------------------------------------------

# The settings the chart has a value for; every other one of the site's goes in as `extraEnv`.
CHART_VALUE_PATHS = {
    "KUBETUNE_TRAINER_IMAGE": ("defaults", "trainerImage"),
    "KUBETUNE_IMAGE_PULL_POLICY": ("defaults", "trainerPullPolicy"),
    "KUBETUNE_MLFLOW_TRACKING_URI": ("defaults", "mlflowTrackingUri"),
    "KUBETUNE_STORAGE_CLAIM_NAME": ("defaults", "storage", "claimName"),
    "KUBETUNE_STORAGE_URI": ("defaults", "storage", "uri"),
    "KUBETUNE_RECONCILE_INTERVAL": ("reconcileInterval",),
}


def chart_values(site: Site, operator_image: str | None) -> dict[str, Any]:
    """The chart's values that point the operator at this site, with the e2e intervals; the
    operator image by tag (None: the chart's default, where the node agent ignores images)."""
    values: dict[str, Any] = {"extraEnv": [{"name": "PYTHONUNBUFFERED", "value": "1"}]}
    for name, value in {**site.operator_env(), **E2E_INTERVALS}.items():
        if name not in CHART_VALUE_PATHS:
            values["extraEnv"].append({"name": name, "value": value})
            continue
        *parents, key = CHART_VALUE_PATHS[name]
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = float(value) if key == "reconcileInterval" else value
    if operator_image:
        repository, tag = operator_image.rsplit(":", 1)
        values["image"] = {"repository": repository, "tag": tag, "pullPolicy": site.pull_policy}
    return values


# --- the Jobs that stage inputs and read results -----------------------------------------------

@dataclass(frozen=True)
class Inputs:
    """The staged inputs, as paths the pods see."""
    root: str

    @property
    def model(self) -> str:
        return f"{self.root}/model"

    def data(self, name: str) -> str:
        return f"{self.root}/data/{name}"


def inputs_root(site: Site, namespace: str) -> str:
    return f"{site.storage_root}/{namespace}/{INPUTS_DIR}"


def seed_files(model_dir: Path) -> dict[str, Path]:
    """What the seed ConfigMap holds: path under its mount → file of this machine. The tiny model
    (~0.6 MB) travels with the data, so staging it is a copy, not a build, in every namespace."""
    model = {f"model/{path.name}": path for path in sorted(model_dir.iterdir()) if path.is_file()}
    data = {f"data/{name}": path for name, path in INPUT_FILES.items()}
    return {"seed.py": SEED_SCRIPT, **model, **data}


def item_key(path: str) -> str:
    return path.replace("/", "__")  # ConfigMap keys cannot hold '/'; items put it back


def seed_items(paths) -> list[dict[str, str]]:
    return [{"key": item_key(path), "path": path} for path in paths]


def seed_config_map(namespace: str, model_dir: Path) -> dict[str, Any]:
    files = seed_files(model_dir)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "e2e-seed", "namespace": namespace},
            "binaryData": {item_key(path): base64.b64encode(source.read_bytes()).decode()
                           for path, source in files.items()}}


def storage_claim(site: Site, namespace: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": [site.access_mode],
                            "resources": {"requests": {"storage": "2Gi"}}}
    if site.storage_class:
        spec["storageClassName"] = site.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": STORAGE_CLAIM, "namespace": namespace}, "spec": spec}


def tool_job(site: Site, namespace: str, name: str, args: list[str],
             items: list[dict[str, str]]) -> dict[str, Any]:
    """A one-pod Job of the trainer image running `seed.py ARGS`, with the storage mounted as the
    operator mounts it, Pod Security `restricted` like every kubetune pod."""
    # Scratch space under its own name, not /tmp: the node agent rewrites mount paths in the
    # arguments, and this machine's storage folder lives under /tmp.
    volumes = [{"name": "scratch", "emptyDir": {}},
               {"name": "seed", "configMap": {"name": "e2e-seed", "items": items}}]
    mounts = [{"name": "scratch", "mountPath": SCRATCH},
              {"name": "seed", "mountPath": SEED_MOUNT, "readOnly": True}]
    if not site.storage_folder:
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": STORAGE_CLAIM}})
        mounts.append({"name": "storage", "mountPath": STORAGE_MOUNT})
    container = {
        "name": "tool", "image": site.trainer_image, "imagePullPolicy": site.pull_policy,
        "command": [*site.python, f"{SEED_MOUNT}/seed.py", *args],
        "env": [{"name": "HOME", "value": SCRATCH}, {"name": "TMPDIR", "value": SCRATCH}],
        "volumeMounts": mounts,
    }
    pod = {"automountServiceAccountToken": False, "containers": [container], "volumes": volumes}
    return restricted_job(namespace, name, pod)


def restricted_job(namespace: str, name: str, pod: dict[str, Any]) -> dict[str, Any]:
    """A one-pod Job, run once, its pod and containers meeting Pod Security `restricted` as the
    trainer image's user."""
    containers = [{**c, "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}}
        for c in pod["containers"]]
    pod = {**pod, "restartPolicy": "Never", "containers": containers,
           "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                               "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}}}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": {"kubetune.dev/e2e-tool": name}},
            "spec": {"backoffLimit": 0, "template": {"spec": pod}}}


def run_tool(kubectl, wait_for, job: dict[str, Any]) -> str:
    """Run a tool Job to completion; its output. A failed one raises with its log."""
    meta = job["metadata"]
    kubectl("apply", "-f", "-", input=yaml.safe_dump(job))
    ref, ns = f"job/{meta['name']}", meta["namespace"]

    def ended():
        status = kubectl.json("get", ref, "-n", ns).get("status") or {}
        return status if status.get("succeeded") or status.get("failed") else None
    status = wait_for(ended, JOB_TIMEOUT, f"the e2e tool Job {meta['name']}", interval=0.5)
    logs = kubectl("logs", ref, "-n", ns, check=False).stdout
    if not status.get("succeeded"):
        raise RuntimeError(f"the e2e tool Job {meta['name']} failed:\n{logs}")
    return logs


def stage_inputs(kubectl, wait_for, site: Site, namespace: str, model_dir: Path) -> Inputs:
    """Write the tiny model and the example data to the namespace's storage, through a Job."""
    objects = [seed_config_map(namespace, model_dir)]
    if not site.storage_folder:
        objects.insert(0, storage_claim(site, namespace))
    if site.volume_for:
        objects.insert(0, site.volume_for(namespace, STORAGE_CLAIM))
    kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(objects))
    root = inputs_root(site, namespace)
    run_tool(kubectl, wait_for, tool_job(site, namespace, "e2e-seed",
                               ["seed", "--from", SEED_MOUNT, "--to", root,
                                "--long-copies", str(LONG_DATA_COPIES)],
                               seed_items(seed_files(model_dir))))
    return Inputs(root)


def read_stored(kubectl, wait_for, site: Site, namespace: str, relative: str, job_name: str) -> str:
    """A file under `<storage root>/<namespace>/`, as the pods see it, read by a Job."""
    job = tool_job(site, namespace, job_name, ["cat", f"{site.storage_root}/{namespace}/{relative}"],
                   seed_items(["seed.py"]))
    return run_tool(kubectl, wait_for, job)

