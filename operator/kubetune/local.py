"""`kubetune run RUN.yaml --local`: the operator's own `decide`, with children as local processes.

The plan's Jobs are started as processes from the very manifests the cluster would get (their
command, env and completion indexes), so a local run exercises the same steps as a cluster run.
What a kubelet would do is played minimally here: `$(VAR)` expansion, the downward-API fields
the manifests use, the config volume as a folder, rank 0's address as the loopback.
The run's status is kept in `<workdir>/<name>/status.json`: running again resumes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from kubetune_trainer.config import RunConfig, is_object_store
from kubetune_trainer.storage import SCRATCH_ENV, stage_dir

from .api import TERMINAL, Phase
from .manifests import COMPLETION_INDEX_ANNOTATION, LABEL_ATTEMPT, LABEL_COMPONENT, Component
from .reconcile import JobState, Observed, Plan, PodState, decide, parse_termination_message
from .settings import OperatorSettings

PATH_FIELDS = ("model", "trainDataPath", "evalDataPath", "customWeightsPath")
LOG_TAIL_BYTES = 2000


# --- pure helpers ------------------------------------------------------------------------------

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
    meta.setdefault("creationTimestamp", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
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
        mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}",
        metrics_port=free_port(),  # rank 0 serves here; a fixed port would collide between runs
        config_mount_path=str(workdir / "config"),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion in commands: unknown references stay as written."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def field_value(path: str, pod_name: str, index: int, namespace: str) -> str:
    return {
        f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']": str(index),
        "metadata.name": pod_name,
        "metadata.namespace": namespace,
        "status.podIP": "127.0.0.1",
    }.get(path, "")


def container_env(container: Mapping[str, Any], pod_name: str, index: int, namespace: str,
                  config_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    for item in container.get("env") or []:
        if "value" in item:
            value = item["value"]
        elif "fieldRef" in (item.get("valueFrom") or {}):
            value = field_value(item["valueFrom"]["fieldRef"]["fieldPath"], pod_name, index, namespace)
        else:  # secrets: locally, the user's own environment provides them
            continue
        env[item["name"]] = value
    env["HOME"] = os.environ.get("HOME", str(config_dir))  # the pods' /tmp home is not ours
    env.pop("HF_HOME", None)
    if "MASTER_ADDR" in env:
        env["MASTER_ADDR"] = "127.0.0.1"  # every "node" is this machine
    if SCRATCH_ENV in env:  # an object-store work_dir: stage beside the run, not in the shared /tmp
        env[SCRATCH_ENV] = str(stage_base(config_dir.parent))
    return env


def stage_base(workdir: Path) -> Path:
    return workdir / "stage"


# --- processes standing for pods ------------------------------------------------------------

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
        env = {**self.env, "KUBETUNE_TERMINATION_LOG": str(self.result_file)}
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

    def state(self) -> PodState:
        code = self.process.poll() if self.process else None
        if code is None:
            return PodState(self.name, "Running", self.index, ip="127.0.0.1")
        text = self.result_file.read_text() if self.result_file.exists() else ""
        result = parse_termination_message(text)
        message = "" if result else tail(self.log_file)
        return PodState(self.name, "Succeeded" if code == 0 else "Failed", self.index,
                        exit_code=code, result=result, message=message, ip="127.0.0.1")


def tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    if not path.exists():
        return ""
    data = path.read_bytes()[-size:]
    return data.decode(errors="replace").strip()


@dataclass
class LocalJob:
    manifest: Mapping[str, Any]
    pods: list[LocalPod] = field(default_factory=list)
    deleted: bool = False

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]

    @property
    def backoff_limit(self) -> int:
        return int(self.manifest["spec"].get("backoffLimit") or 0)

    def supervise(self, cwd: Path) -> None:
        """Restart a pod that failed retryably, as the Job controller would within backoffLimit."""
        for pod in self.pods:
            state = pod.state()
            if state.failed and not state.permanent and pod.restarts < self.backoff_limit:
                pod.restarts += 1
                pod.start(cwd)

    def state(self) -> JobState:
        labels = self.manifest["metadata"].get("labels") or {}
        pods = tuple(pod.state() for pod in self.pods)
        failed = [p for p in pods if p.failed]
        gave_up = [p for p in failed if p.permanent or self._pod(p.name).restarts >= self.backoff_limit]
        succeeded = sum(p.phase == "Succeeded" for p in pods)
        return JobState(
            name=self.name,
            component=Component(labels.get(LABEL_COMPONENT, Component.PREP.value)),
            attempt=int(labels.get(LABEL_ATTEMPT, "0") or 0),
            active=sum(p.phase == "Running" for p in pods),
            succeeded=succeeded,
            completions=len(pods),
            complete=succeeded == len(pods),
            failed_reason="BackoffLimitExceeded" if gave_up else None,
            pods=pods,
        )

    def _pod(self, name: str) -> LocalPod:
        return next(pod for pod in self.pods if pod.name == name)


def pods_of(job: Mapping[str, Any], config_dir: Path, folder: Path) -> list[LocalPod]:
    spec = job["spec"]
    container = spec["template"]["spec"]["containers"][0]
    namespace = job["metadata"]["namespace"]
    pods = []
    for index in range(int(spec.get("completions") or 1)):
        name = f"{job['metadata']['name']}-{index}"
        env = container_env(container, name, index, namespace, config_dir)
        argv = [expand(arg, env) for arg in [*container.get("command", []), *container.get("args", [])]]
        pods.append(LocalPod(name, index, argv, env, folder))
    return pods


# --- the loop --------------------------------------------------------------------------------

class LocalRun:
    def __init__(self, body: dict[str, Any], workdir: Path, settings: OperatorSettings,
                 say: Callable[[str], None] = print):
        self.body, self.workdir, self.settings, self.say = body, workdir.resolve(), settings, say
        self.folder = self.workdir / body["metadata"]["name"]
        self.folder.mkdir(parents=True, exist_ok=True)
        Path(settings.config_mount_path).mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, LocalJob] = {}
        self.services: set[str] = set()
        self.last_progress = ""
        self.body["status"] = self._saved_status()

    @property
    def status_file(self) -> Path:
        return self.folder / "status.json"

    def _saved_status(self) -> dict[str, Any]:
        if self.status_file.exists():
            return json.loads(self.status_file.read_text())
        return self.body.get("status") or {}

    def config(self) -> RunConfig | None:
        path = Path(self.settings.config_file)
        return RunConfig.model_validate_json(path.read_text()) if path.exists() else None

    def progress(self, config: RunConfig | None) -> dict[str, Any] | None:
        path = self.progress_file(config) if config else None
        if path is None or not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:  # caught mid-write by a non-atomic writer: next tick
            return None

    def progress_file(self, config: RunConfig) -> Path:
        """Rank 0 writes progress into its working copy: the work_dir, or its staging copy."""
        if not is_object_store(config.work_dir):
            return Path(config.progress_file)
        return stage_dir(config.work_dir, str(stage_base(self.workdir))) / "result" / "progress.json"

    def observed(self) -> Observed:
        live = [job.state() for job in self.jobs.values() if not job.deleted]
        config = self.config()
        by = {c: [j for j in live if j.component is c] for c in Component}
        return Observed(
            config_map=config is not None, config=config, service=bool(self.services),
            prep=next(iter(by[Component.PREP]), None),
            train=tuple(sorted(by[Component.TRAIN], key=lambda j: j.attempt)),
            finalize=next(iter(by[Component.FINALIZE]), None),
            progress=self.progress(config) if by[Component.TRAIN] else None,
        )

    def create(self, manifest: Mapping[str, Any]) -> None:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if kind == "ConfigMap":
            for key, text in (manifest.get("data") or {}).items():
                (Path(self.settings.config_mount_path) / key).write_text(text)
        elif kind == "Service":
            self.services.add(name)
        elif kind == "Job" and name not in self.jobs:
            job = LocalJob(manifest, pods_of(manifest, Path(self.settings.config_mount_path), self.folder))
            for pod in job.pods:
                pod.start(self.workdir)
            self.jobs[name] = job

    def delete(self, name: str) -> None:
        job = self.jobs.pop(name, None)
        if job is not None:
            for pod in job.pods:
                pod.stop()
        self.services.discard(name)

    def apply(self, plan: Plan) -> None:
        for ref in plan.delete:
            self.delete(ref.name)
        for manifest in plan.create:
            self.create(manifest)
        if plan.status:
            self.body["status"] = merge_patch(self.body.get("status") or {}, plan.status)
            self.status_file.write_text(json.dumps(self.body["status"], indent=2))
        for event in plan.events:
            self.say(f"{event.time}  {event.type.value:<16} {event.message}")

    def step(self) -> Plan:
        for job in self.jobs.values():
            job.supervise(self.workdir)
        plan = decide(self.body, self.observed(), datetime.now(timezone.utc), self.settings)
        self.apply(plan)
        self.show_progress()
        return plan

    def show_progress(self) -> None:
        progress = (self.body.get("status") or {}).get("progress") or {}
        if not progress or self.phase != Phase.TRAINING.value:
            return
        line = progress_line(progress)
        if line != self.last_progress:
            self.last_progress = line
            self.say(line)

    @property
    def phase(self) -> str:
        return (self.body.get("status") or {}).get("phase") or Phase.PENDING.value

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
            for name in list(self.jobs):
                self.delete(name)
        return self.phase


def progress_line(progress: dict[str, Any]) -> str:
    eta = progress.get("etaSeconds")
    return "  training {:5.1f}%  loss {}  {} tok/s  ETA {}".format(
        float(progress.get("percent") or 0), _num(progress.get("loss")),
        _num(progress.get("tokensPerSecond"), 0), "-" if eta is None else f"{_num(eta, 0)}s")


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{float(value):.{digits}f}" if digits else str(int(float(value)))
