"""`kubetune run RUN.yaml --local`: the operator's own tick, with children as local processes.

`LocalCluster` is local mode's `tick.Cluster`: the plan's Jobs start as processes from the very
manifests the cluster would get, and their state comes back in the API's shape, so a local
run goes through the same `tick.reconcile` (observe → decide → apply) as a cluster run. What a
kubelet would do comes from `kubelet` (the environment, the termination message), what the Job
controller would do is played minimally here (a pod per completion index, retries within
backoffLimit), and rank 0's address is the loopback. The config volume is a folder, and the
run's status is kept in `<workdir>/<name>/status.json`: running again resumes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetune_trainer.config import RunConfig
from kubetune_trainer.contract import (
    ENV_MASTER_ADDR,
    ENV_MLFLOW_TRACKING_URI,
    ENV_SCRATCH_DIR,
    ENV_TERMINATION_LOG,
    EXIT_PERMANENT,
)

from .api import TERMINAL, Phase, Progress
from .foundation_model.follow import progress_text
from .kubelet import command_line, exit_code_of, resolve_env, tail_bytes, termination_message
from .manifests import COMPLETION_INDEX_ANNOTATION, JOB_NAME_LABEL, LABEL_RUN
from .reconcile import ChildRef, PlannedEvent, observe
from .settings import OperatorSettings
from .tick import Children, ProgressReader, reconcile
from .timestamps import now_iso

PATH_FIELDS = ("model", "trainDataPath", "evalDataPath", "customWeightsPath")
LOOPBACK = "127.0.0.1"  # every pod's IP: all "nodes" are this machine
LOG_TAIL_BYTES = 4096
PROGRESS_INTERVAL = 1.0  # seconds between reads of rank 0's progress (a terminal, not an API)


# --- the run as the API server would store it ------------------------------------------------

def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, as the API server applies a status patch."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_patch(merged[key], value)
        else:
            merged[key] = value
    return merged


def absolutize(spec: Mapping[str, Any], cwd: Path) -> dict[str, Any]:
    """Local paths relative to where `kubetune run` was called; hub ids and URIs stay as they are."""
    spec = dict(spec)
    for key in PATH_FIELDS:
        value = spec.get(key)
        if isinstance(value, str) and "://" not in value and (
                value.startswith((".", "/")) or (cwd / value).exists()):
            spec[key] = str((cwd / value).resolve())
    return spec


def local_body(document: Mapping[str, Any], cwd: Path, workdir: Path) -> dict[str, Any]:
    """The TrainingRun as the API server would store it, with a stable uid per workdir."""
    meta = dict(document.get("metadata") or {})
    name = str(meta.get("name") or "run")
    meta.setdefault("namespace", "default")
    meta["uid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{workdir.resolve()}/{meta['namespace']}/{name}"))
    meta.setdefault("generation", 1)
    meta.setdefault("creationTimestamp", now_iso())
    spec = document.get("spec")
    return {**document, "metadata": meta,
            "spec": absolutize(spec, cwd) if isinstance(spec, Mapping) else spec}


def local_settings(workdir: Path) -> OperatorSettings:
    workdir = workdir.resolve()
    return OperatorSettings(
        trainer_command=[sys.executable, "-m", "kubetune_trainer"],
        torchrun_command=[sys.executable, "-m", "torch.distributed.run"],
        storage_claim_name=None,
        storage_uri=str(workdir / "storage"),
        mlflow_tracking_uri=os.environ.get(ENV_MLFLOW_TRACKING_URI) or f"sqlite:///{workdir / 'mlflow.db'}",
        metrics_port=free_port(),  # rank 0 serves here; a fixed port would collide between runs
        config_mount_path=str(workdir / "config"),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# --- processes standing for pods ------------------------------------------------------------

def container_env(container: Mapping[str, Any], pod_name: str, index: int, namespace: str,
                  stage_dir: Path) -> dict[str, str]:
    """The kubelet's environment for a local process: the user's own environment (operator
    settings left out) in place of the image's, secrets left to it too, every node on the
    loopback."""
    pod = {"metadata": {"name": pod_name, "namespace": namespace,
                        "annotations": {COMPLETION_INDEX_ANNOTATION: str(index)}},
           "status": {"podIP": LOOPBACK, "hostIP": LOOPBACK}}
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    env = resolve_env(without_secrets(container), pod, lookup=lambda *_: None, base=inherited)
    env["HOME"] = os.environ.get("HOME", str(stage_dir))  # the pods' /tmp home is not ours
    env.pop("HF_HOME", None)
    if ENV_MASTER_ADDR in env:
        env[ENV_MASTER_ADDR] = LOOPBACK
    if ENV_SCRATCH_DIR in env:  # an object-store work_dir: stage beside the run, not in /tmp
        env[ENV_SCRATCH_DIR] = str(stage_dir)
    return env


def without_secrets(container: Mapping[str, Any]) -> dict[str, Any]:
    """Locally, the user's own environment provides what Secrets would."""
    env = [v for v in container.get("env") or [] if "secretKeyRef" not in (v.get("valueFrom") or {})]
    return {**container, "env": env, "envFrom": []}


@dataclass
class LocalPod:
    name: str
    index: int
    argv: list[str]
    env: dict[str, str]
    folder: Path
    process: subprocess.Popen | None = None
    restarts: int = 0

    @property
    def result_file(self) -> Path:
        return self.folder / f"{self.name}.result.json"

    @property
    def log_file(self) -> Path:
        return self.folder / f"{self.name}.log"

    def start(self, cwd: Path) -> None:
        self.result_file.unlink(missing_ok=True)
        env = {**self.env, ENV_TERMINATION_LOG: str(self.result_file)}
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=env, cwd=cwd, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    @property
    def exit_code(self) -> int | None:
        code = self.process.poll() if self.process else None
        return None if code is None else exit_code_of(code)

    def status(self, policy: str) -> dict[str, Any]:
        """The pod's status as the kubelet reports it."""
        code = self.exit_code
        if code is None:
            return {"phase": "Running", "podIP": LOOPBACK,
                    "containerStatuses": [{"state": {"running": {}}}]}
        result = self.result_file.read_bytes() if self.result_file.exists() else b""
        message = termination_message(result, tail_bytes(self.log_file, LOG_TAIL_BYTES), code, policy)
        return {"phase": "Succeeded" if code == 0 else "Failed", "podIP": LOOPBACK,
                "containerStatuses": [{"state": {"terminated": {
                    "exitCode": code, "message": message, "reason": "Completed" if code == 0 else "Error"}}}]}


@dataclass
class LocalJob:
    """A Job and its pods, shown to `observe` as the Job controller and kubelet would."""

    manifest: Mapping[str, Any]
    pods: list[LocalPod] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]

    @property
    def container(self) -> Mapping[str, Any]:
        return self.manifest["spec"]["template"]["spec"]["containers"][0]

    @property
    def backoff_limit(self) -> int:
        return int(self.manifest["spec"].get("backoffLimit") or 0)

    def supervise(self, cwd: Path, permanent_exit: int) -> None:
        """Start a pod that failed retryably again, as the Job controller would within backoffLimit."""
        for pod in self.pods:
            code = pod.exit_code
            if code not in (None, 0, permanent_exit) and pod.restarts < self.backoff_limit:
                pod.restarts += 1
                pod.start(cwd)

    def api_objects(self, permanent_exit: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the Job, its pods) in the API's shape."""
        policy = self.container.get("terminationMessagePolicy", "File")
        meta = self.manifest["metadata"]
        template_labels = self.manifest["spec"]["template"]["metadata"]["labels"]
        pods = [{"metadata": {"name": pod.name, "namespace": meta["namespace"],
                              "labels": {**template_labels, JOB_NAME_LABEL: self.name},
                              "annotations": {COMPLETION_INDEX_ANNOTATION: str(pod.index)}},
                 "status": pod.status(policy)} for pod in self.pods]
        codes = [pod.exit_code for pod in self.pods]
        gave_up = any(code == permanent_exit or (code not in (None, 0) and pod.restarts >= self.backoff_limit)
                      for code, pod in zip(codes, self.pods))
        conditions = []
        if gave_up:
            conditions.append({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})
        elif all(code == 0 for code in codes):
            conditions.append({"type": "Complete", "status": "True"})
        status = {"active": codes.count(None), "succeeded": codes.count(0), "conditions": conditions}
        return {**self.manifest, "status": status}, pods


class LocalCluster:
    """Local mode's `tick.Cluster`: one run's children as processes and folders on this machine."""

    def __init__(self, body: dict[str, Any], workdir: Path, settings: OperatorSettings,
                 say: Callable[[str], None]):
        self.body, self.workdir, self.settings, self.say = body, workdir, settings, say
        self.folder = workdir / body["metadata"]["name"]
        self.config_dir = Path(settings.config_mount_path)
        for folder in (self.folder, self.config_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, LocalJob] = {}
        self.services: dict[str, Mapping[str, Any]] = {}
        self.permanent_exit = EXIT_PERMANENT

    @property
    def status_file(self) -> Path:
        return self.folder / "status.json"

    @property
    def stage_dir(self) -> Path:
        return self.workdir / "stage"

    def supervise(self) -> None:
        for job in self.jobs.values():
            job.supervise(self.workdir, self.permanent_exit)

    # -- what exists ---------------------------------------------------------------------------
    def children(self, namespace: str, run: str) -> Children:
        jobs, pods = [], []
        for job in self.jobs.values():
            job_object, job_pods = job.api_objects(self.permanent_exit)
            jobs.append(job_object)
            pods.extend(job_pods)
        return {"jobs": jobs, "pods": pods, "config_maps": self.config_maps(run),
                "services": list(self.services.values())}

    def config_maps(self, run: str) -> list[dict[str, Any]]:
        """The config volume's folder is the ConfigMap: it outlives this process, so a run
        started again keeps the snapshot it began with."""
        files = {f.name: f.read_text() for f in sorted(self.config_dir.glob("*")) if f.is_file()}
        if not files:
            return []
        return [{"metadata": {"name": f"{run}-config", "labels": {LABEL_RUN: run}}, "data": files}]

    # -- the plan's writes -----------------------------------------------------------------------
    def create(self, manifest: Mapping[str, Any]) -> None:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if kind == "ConfigMap":
            for key, text in (manifest.get("data") or {}).items():
                (self.config_dir / key).write_text(text)
        elif kind == "Service":
            self.services[name] = manifest
        elif kind == "Job" and name not in self.jobs:
            job = LocalJob(manifest, self._pods(manifest))
            for pod in job.pods:
                pod.start(self.workdir)
            self.jobs[name] = job

    def _pods(self, job: Mapping[str, Any]) -> list[LocalPod]:
        container = job["spec"]["template"]["spec"]["containers"][0]
        namespace, pods = job["metadata"]["namespace"], []
        for index in range(int(job["spec"].get("completions") or 1)):
            name = f"{job['metadata']['name']}-{index}"
            env = container_env(container, name, index, namespace, self.stage_dir)
            pods.append(LocalPod(name, index, command_line(container, env), env, self.folder))
        return pods

    def delete(self, ref: ChildRef) -> None:
        job = self.jobs.pop(ref.name, None)
        for pod in job.pods if job else ():
            pod.stop()

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.body["status"] = merge_patch(self.body.get("status") or {}, status)
        self.status_file.write_text(json.dumps(self.body["status"], indent=2))

    def delete_run(self, namespace: str, name: str) -> None:
        """ttlSecondsAfterFinished: a local run leaves its status file for the person who ran it."""

    def post_event(self, run: Mapping[str, Any], event: PlannedEvent, now: datetime) -> None:
        self.say(f"{event.time}  {event.type.value:<16} {event.message}")

    def stop_all(self) -> None:
        for name in list(self.jobs):
            self.delete(ChildRef("Job", name, ""))


# --- the loop --------------------------------------------------------------------------------

class LocalRun:
    def __init__(self, body: dict[str, Any], workdir: Path, settings: OperatorSettings,
                 say: Callable[[str], None] = print):
        self.body, self.workdir, self.settings, self.say = body, workdir.resolve(), settings, say
        self.cluster = LocalCluster(body, self.workdir, settings, say)
        self.progress = ProgressReader(PROGRESS_INTERVAL)
        self.last_progress = ""
        if self.cluster.status_file.exists():
            self.body["status"] = json.loads(self.cluster.status_file.read_text())

    @property
    def phase(self) -> str:
        return (self.body.get("status") or {}).get("phase") or Phase.PENDING.value

    @property
    def folder(self) -> Path:
        """Where the run's logs, results and status file are."""
        return self.cluster.folder

    def config(self) -> RunConfig | None:
        """The run's resolved config, as its snapshot holds it (None before it exists)."""
        return observe(config_maps=self.cluster.config_maps(self.body["metadata"]["name"])).config

    def step(self):
        self.cluster.supervise()
        meta = self.body["metadata"]
        children = self.cluster.children(meta["namespace"], meta["name"])
        plan = reconcile(self.cluster, self.body, children, self.settings, self.progress,
                         datetime.now(timezone.utc))
        self.show_progress()
        return plan

    def show_progress(self) -> None:
        progress = (self.body.get("status") or {}).get("progress") or {}
        # Registering too: the run's last progress (100%) lands as training ends.
        if not progress or self.phase not in (Phase.TRAINING.value, Phase.REGISTERING.value):
            return
        line = f"  training {progress_text(Progress.model_validate(progress))}"  # the SDK's line
        if line != self.last_progress:
            self.last_progress = line
            self.say(line)

    def cancel(self) -> None:
        self.body.setdefault("metadata", {}).setdefault("annotations", {})[
            self.settings.cancel_annotation] = "true"

    def run(self, poll: float = 0.5) -> str:
        terminal = {p.value for p in TERMINAL}
        try:
            while self.phase not in terminal:
                self.step()
                if self.phase not in terminal:
                    time.sleep(poll)
        except KeyboardInterrupt:
            self.say("interrupted: cancelling the run")
            self.cancel()
            self.step()
        finally:
            self.cluster.stop_all()
        return self.phase
