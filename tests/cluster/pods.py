"""Pure helpers of the test node agent: what a kubelet computes from a pod, without the I/O.

Pods are plain dicts in the API's JSON shape (camelCase), as the API server sends them. What
local mode computes too (the environment, fieldRef, the termination message) lives once in
`kubetune.kubelet`; it is named here for the agent's convenience.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from kubetune.kubelet import (  # noqa: F401 (the agent's names for the shared helpers)
    ContainerConfigError,
    Lookup,
    exit_code_of,
    expand,
    field_ref,
    object_data,
    resolve_env,
    tail_bytes,
    termination_message,
)
from kubetune.timestamps import now_iso  # noqa: F401

# -- scheduling -----------------------------------------------------------------------------
def selector_matches(node_selector: dict | None, node_labels: dict) -> bool:
    return all(node_labels.get(k) == v for k, v in (node_selector or {}).items())


def schedulable(pod: dict, node_labels: dict) -> bool:
    spec = pod["spec"]
    return (not spec.get("schedulingGates")
            and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
            and selector_matches(spec.get("nodeSelector"), node_labels))


# -- stand-ins for mounts and cluster DNS ----------------------------------------------------
def rewrite_paths(text: str, mounts: dict[str, str]) -> str:
    """Replace each mount path (at a path boundary) by its host folder, longest first and in
    one pass, so a host path is never rewritten again."""
    table = {k.rstrip("/"): v for k, v in mounts.items() if k.rstrip("/")}
    if not table:
        return text
    alternatives = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])(?:{alternatives})(?=$|/|[^\w.-])")
    return pattern.sub(lambda m: table[m.group(0)], text)


_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
POD_DNS = re.compile(rf"\b({_LABEL})\.({_LABEL})\.({_LABEL})\.svc(?:\.cluster\.local)?\b\.?")


def rewrite_dns(text: str, resolve: Callable[[str, str, str], "str | None"]) -> tuple[str, list[str]]:
    """Replace `<hostname>.<subdomain>.<ns>.svc[.cluster.local]` by the pod's IP.
    Returns the text and the names that did not resolve (left as they were)."""
    missing: list[str] = []

    def sub(m: re.Match) -> str:
        ip = resolve(m.group(1), m.group(2), m.group(3))
        if ip is None:
            missing.append(m.group(0))
            return m.group(0)
        return ip
    return POD_DNS.sub(sub, text), missing


# -- container state and pod status ----------------------------------------------------------
@dataclass
class ContainerState:
    """What the agent knows of one container; `status()` is its containerStatuses entry."""
    name: str
    image: str = ""
    state: str = "waiting"           # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    exit_code: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    restart_count: int = 0
    pid: int | None = None
    last_terminated: dict | None = None

    def waiting(self, reason: str, message: str = "") -> None:
        self.state, self.reason, self.message = "waiting", reason, message

    def running(self, pid: int) -> None:
        self.state, self.pid, self.started_at = "running", pid, now_iso()
        self.reason, self.message, self.exit_code, self.finished_at = "", "", None, None

    def terminated(self, exit_code: int, message: str = "", reason: str | None = None) -> None:
        self.state, self.exit_code, self.message = "terminated", exit_code, message
        self.reason = reason or ("Completed" if exit_code == 0 else "Error")
        self.finished_at = now_iso()

    def restarting(self, reason: str = "CrashLoopBackOff") -> None:
        self.last_terminated = self._terminated_status()
        self.restart_count += 1
        self.waiting(reason, f"back-off restarting failed container {self.name}")

    def _terminated_status(self) -> dict:
        t = {"exitCode": self.exit_code, "reason": self.reason,
             "startedAt": self.started_at, "finishedAt": self.finished_at,
             "containerID": f"kubetune://{self.pid}"}
        if self.message:
            t["message"] = self.message
        return {"terminated": t}

    def status(self) -> dict:
        if self.state == "running":
            state = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = self._terminated_status()
        else:
            state = {"waiting": {"reason": self.reason, **({"message": self.message} if self.message else {})}}
        out = {"name": self.name, "image": self.image, "imageID": "", "state": state,
               "lastState": self.last_terminated or {}, "ready": self.state == "running",
               "started": self.state == "running", "restartCount": self.restart_count}
        if self.pid is not None:
            out["containerID"] = f"kubetune://{self.pid}"
        return out


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def pod_phase(init: list[ContainerState], app: list[ContainerState], policy: str) -> str:
    """The kubelet's phase rule, for pods whose containers the agent runs."""
    if any(c.state == "terminated" and c.exit_code != 0 for c in init) and policy == "Never":
        return "Failed"
    if not all(c.state == "terminated" and c.exit_code == 0 for c in init):
        return "Pending"
    if all(c.state == "terminated" for c in app):
        if policy == "Always" or (policy == "OnFailure" and any(c.exit_code for c in app)):
            return "Running"     # about to restart
        return "Failed" if any(c.exit_code for c in app) else "Succeeded"
    if any(c.state in ("running", "terminated") or c.restart_count for c in app):
        return "Running"
    return "Pending"


@dataclass
class Conditions:
    """Pod conditions with stable lastTransitionTime (changed only when a status flips)."""
    since: dict[str, tuple[str, str]] = field(default_factory=dict)

    def build(self, phase: str, init_done: bool, all_running: bool) -> list[dict]:
        ready = all_running and phase == "Running"
        wanted = {"PodReadyToStartContainers": True, "Initialized": init_done,
                  "Ready": ready, "ContainersReady": ready, "PodScheduled": True}
        out = []
        for ctype, ok in wanted.items():
            status = "True" if ok else "False"
            if self.since.get(ctype, ("",))[0] != status:
                self.since[ctype] = (status, now_iso())
            cond = {"type": ctype, "status": status, "lastTransitionTime": self.since[ctype][1]}
            if not ok and phase in ("Succeeded", "Failed") and ctype in ("Ready", "ContainersReady"):
                cond["reason"] = "PodCompleted"
            out.append(cond)
        return out


def pod_status(phase: str, conditions: list[dict], ip: str, start_time: str,
               init: list[ContainerState], app: list[ContainerState]) -> dict:
    return {"phase": phase, "conditions": conditions,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": start_time,
            "initContainerStatuses": [c.status() for c in init],
            "containerStatuses": [c.status() for c in app]}
