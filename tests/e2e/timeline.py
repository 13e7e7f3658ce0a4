"""Where a run's time went, from the API's own timestamps: the run's events, each Job's and
pod's creation, the pod conditions (scheduled, sandbox ready, containers ready), each
container's start and end, and the first and last line its container logged.

    print(format_timeline(run_timeline(kubectl, namespace, "my-run")))

The API's timestamps are whole seconds (log lines carry nanoseconds), so steps shorter than a
second show as 0. The e2e lifecycle tests print it, so a slow site shows where it is slow.
"""

from __future__ import annotations

from datetime import datetime

POD_CONDITIONS = {"PodScheduled": "scheduled", "PodReadyToStartContainers": "sandbox ready",
                  "ContainersReady": "containers ready"}


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def run_marks(run: dict) -> list[tuple[float, str]]:
    marks = [(seconds(run["metadata"]["creationTimestamp"]), "run created")]
    marks += [(seconds(e["time"]), f"event {e['type']}") for e in (run.get("status") or {}).get("events") or []
              if e.get("time")]
    return marks


def job_marks(job: dict) -> list[tuple[float, str]]:
    name, status = f"job {job['metadata']['name']}", job.get("status") or {}
    marks = [(seconds(job["metadata"]["creationTimestamp"]), f"{name} created")]
    if status.get("completionTime"):
        marks.append((seconds(status["completionTime"]), f"{name} complete"))
    return marks


def pod_marks(pod: dict) -> list[tuple[float, str]]:
    name, status = f"pod {pod['metadata']['name']}", pod.get("status") or {}
    marks = [(seconds(pod["metadata"]["creationTimestamp"]), f"{name} created")]
    for condition in status.get("conditions") or []:
        what = POD_CONDITIONS.get(condition["type"])
        if what and condition["status"] == "True" and condition.get("lastTransitionTime"):
            marks.append((seconds(condition["lastTransitionTime"]), f"{name} {what}"))
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        ran = state.get("running") or state.get("terminated") or {}
        if ran.get("startedAt"):
            marks.append((seconds(ran["startedAt"]), f"{name} {container['name']} started"))
        if ran.get("finishedAt"):
            marks.append((seconds(ran["finishedAt"]), f"{name} {container['name']} finished "
                                                      f"(exit {ran.get('exitCode')})"))
    return marks


def log_marks(pod_name: str, timestamped_log: str) -> list[tuple[float, str]]:
    """The first and the last line of a `kubectl logs --timestamps` output (none where the node
    gives no RFC 3339 stamps: the node agent's logs are the processes' own output)."""
    lines = [line for line in timestamped_log.splitlines() if line.strip()]
    marks = []
    for line, what in ((lines[:1], "first"), (lines[-1:], "last")):
        for text in line:
            stamp, _, rest = text.partition(" ")
            if "T" in stamp and stamp.endswith("Z"):
                marks.append((seconds(stamp), f"pod {pod_name} {what} log line: {rest[:60]}"))
    return marks


def run_timeline(kubectl, namespace: str, name: str) -> list[tuple[float, str]]:
    """Every mark of run `name` and its children, in order; seconds since the run's creation."""
    run = kubectl.json("get", "trainingrun", name, "-n", namespace)
    children = kubectl.json("get", "jobs,pods", "-n", namespace, "-l", f"kubetune.dev/run={name}")["items"]
    marks = run_marks(run)
    for obj in children:
        if obj["kind"] == "Job":
            marks += job_marks(obj)
        else:
            marks += pod_marks(obj)
            log = kubectl("logs", obj["metadata"]["name"], "-n", namespace, "--timestamps",
                          "--all-containers", check=False, timeout=30).stdout
            marks += log_marks(obj["metadata"]["name"], log)
    start = marks[0][0]
    return sorted((t - start, what) for t, what in marks)


def format_timeline(marks: list[tuple[float, str]]) -> str:
    out, last = [], 0.0
    for t, what in marks:
        out.append(f"{t:8.1f}s  +{t - last:5.1f}  {what}")
        last = t
    return "\n".join(out)
