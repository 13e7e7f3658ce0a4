"""Properties of `decide` over random histories of a simulated cluster.

The simulator applies each plan (status merge patch, children created, Jobs deleted with
foreground propagation), then lets the world move at random: Jobs start, succeed, fail with
retryable or permanent exit codes, get admitted or preempted by Kueue, finish deleting; the user
suspends, resumes or cancels; time passes; sometimes a status write is lost. After every
decision the invariants below must hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.api import TERMINAL, Phase
from kubetune.manifests import LABEL_ATTEMPT, LABEL_COMPONENT, Component
from kubetune.reconcile import JobState, Observed, Plan, PodState, decide
from kubetune.reconcile.observe import config_snapshot
from kubetune.settings import OperatorSettings

SETTINGS = OperatorSettings(trainer_image="trainer:test")
START = datetime(2026, 3, 1, tzinfo=timezone.utc)
STEPS = ("DataPrepared", "Trained", "Registered")
ACTIVE = {Phase.QUEUED, Phase.PREPARING_DATA, Phase.TRAINING, Phase.REGISTERING, Phase.SUSPENDED}
# Written down independently of the code: where each phase may go next.
LEGAL: dict[Phase, set[Phase]] = {
    Phase.PENDING: set(Phase),
    Phase.QUEUED: ACTIVE | TERMINAL,
    Phase.PREPARING_DATA: ACTIVE | TERMINAL,
    Phase.TRAINING: (ACTIVE - {Phase.PREPARING_DATA}) | TERMINAL,
    Phase.REGISTERING: {Phase.QUEUED, Phase.REGISTERING, Phase.SUSPENDED} | TERMINAL,
    Phase.SUSPENDED: ACTIVE | TERMINAL,
    **{phase: {phase} for phase in TERMINAL},
}
# Which steps must (True) or must not (False) be done in each working phase.
PHASE_STEPS = {
    Phase.PREPARING_DATA: {"DataPrepared": False},
    Phase.TRAINING: {"DataPrepared": True, "Trained": False},
    Phase.REGISTERING: {"Trained": True, "Registered": False},
    Phase.SUCCEEDED: {"DataPrepared": True, "Trained": True, "Registered": True},
}
RESULTS = {
    Component.PREP: {"dataStats": {"samples": 10, "tokens": 100, "truncatedSamples": 0,
                                   "sequences": 5, "packingEfficiency": 0.8}},
    Component.TRAIN: {"latestCheckpoint": "ckpt/latest-rank0.pt",
                      "mlflow": {"experimentId": "1", "runId": "r"}},
    Component.FINALIZE: {"registeredModel": {"name": "main.ml.demo", "version": "1"}},
}


@dataclass
class Cluster:
    body: dict[str, Any]
    now: datetime = START
    jobs: dict[str, JobState] = field(default_factory=dict)
    config_map: dict[str, Any] | None = None
    service: bool = False
    progress: dict[str, Any] | None = None

    def observed(self) -> Observed:
        def of(component: Component) -> list[JobState]:
            return [j for j in self.jobs.values() if j.component is component]
        snapshot, problem = config_snapshot(self.config_map) if self.config_map else (None, None)
        return Observed(
            config_map=self.config_map is not None,
            snapshot=snapshot,
            snapshot_problem=problem,
            service=self.service,
            prep=next(iter(of(Component.PREP)), None),
            train=tuple(sorted(of(Component.TRAIN), key=lambda j: j.attempt)),
            finalize=next(iter(of(Component.FINALIZE)), None),
            progress=self.progress)

    @property
    def status(self) -> dict[str, Any]:
        return self.body["status"]

    def apply(self, plan: Plan, keep_status: bool = True) -> None:
        if keep_status:
            self.body = {**self.body, "status": {**self.status, **plan.status}}
        for manifest in plan.create:
            self._create(manifest)
        for ref in plan.delete:
            if ref.name in self.jobs:  # foreground: terminating until its pods are gone
                self.jobs[ref.name] = replace(self.jobs[ref.name], terminating=True)

    def _create(self, manifest: dict[str, Any]) -> None:
        name, kind = manifest["metadata"]["name"], manifest["kind"]
        if kind == "ConfigMap":
            self.config_map = manifest
        elif kind == "Service":
            self.service = True
        else:
            labels = manifest["metadata"]["labels"]
            self.jobs[name] = JobState(
                name=name, component=Component(labels[LABEL_COMPONENT]),
                attempt=int(labels.get(LABEL_ATTEMPT, 0)),
                suspended=manifest["spec"]["suspend"],
                completions=manifest["spec"].get("completions", 1))


# --- what the world does between decisions ---------------------------------------------------

def _start(job: JobState) -> JobState:
    pods = tuple(PodState(f"{job.name}-{i}", "Running", i, ip=f"10.0.0.{i}")
                 for i in range(job.completions))
    return replace(job, active=job.completions, pods=pods)


def _succeed(job: JobState) -> JobState:
    result = {"ok": True, **RESULTS[job.component]}
    pods = tuple(PodState(f"{job.name}-{i}", "Succeeded", i, exit_code=0, result=result)
                 for i in range(job.completions))
    return replace(job, active=0, succeeded=job.completions, complete=True, pods=pods)


def _fail(job: JobState, exit_code: int, job_condition: bool) -> JobState:
    result = {"ok": False, "reason": "InvalidInput" if exit_code == 2 else "TransientError",
              "message": "boom", "permanent": exit_code == 2}
    pod = PodState(f"{job.name}-0", "Failed", 0, exit_code=exit_code, result=result)
    # Prep and finalize Jobs retry their own pods: only the Job's condition means failed.
    needs_condition = job.component is not Component.TRAIN
    reason = "BackoffLimitExceeded" if job_condition or needs_condition else None
    return replace(job, active=0, failed_reason=reason, pods=(pod,))


def _preempt(job: JobState) -> JobState:
    pods = tuple(replace(p, phase="Failed", exit_code=143, terminating=True) for p in job.pods)
    return replace(job, suspended=True, active=0, pods=pods)


@st.composite
def world_move(draw: st.DrawFn, cluster: Cluster) -> None:
    live = sorted(name for name, j in cluster.jobs.items() if not j.terminating)
    going = sorted(name for name, j in cluster.jobs.items() if j.terminating)
    moves = ["tick", "progress", "suspend", "resume", "cancel"]
    # Mostly moves that advance the run, so histories get deep (retries, registration).
    moves += ["start", "succeed", "succeed", "fail", "fail", "admit", "preempt"] * 3 if live else []
    moves += ["gone"] * 3 if going else []
    move = draw(st.sampled_from(moves))
    if move == "tick":
        cluster.now += timedelta(seconds=draw(st.integers(1, 4000)))
    elif move == "progress":
        cluster.progress = {"percent": draw(st.floats(0, 100)), "batchesDone": 1,
                            "batchesTotal": 10, "latestCheckpoint": draw(st.sampled_from(
                                [None, "ckpt/ep0-ba1-rank0.pt", "ckpt/ep0-ba2-rank0.pt"]))}
    elif move in ("suspend", "resume"):
        cluster.body = {**cluster.body, "spec": {**cluster.body["spec"], "suspend": move == "suspend"}}
    elif move == "cancel":
        metadata = {**cluster.body["metadata"], "annotations": {"kubetune.dev/cancel": "true"}}
        cluster.body = {**cluster.body, "metadata": metadata}
    elif move == "gone":
        del cluster.jobs[draw(st.sampled_from(going))]
    else:
        name = draw(st.sampled_from(live))
        job = cluster.jobs[name]
        cluster.jobs[name] = {
            "start": lambda: job if job.suspended else _start(job),
            "succeed": lambda: job if job.suspended else _succeed(job),
            "fail": lambda: _fail(job, draw(st.sampled_from([1, 1, 2])), draw(st.booleans())),
            "admit": lambda: replace(job, suspended=False),
            "preempt": lambda: _preempt(job),
        }[move]()


# --- invariants ------------------------------------------------------------------------------

def _true_steps(status: dict[str, Any]) -> set[str]:
    return {c["type"] for c in status.get("conditions") or []
            if c["type"] in STEPS and c["status"] == "True"}


def check(before: dict[str, Any], plan: Plan, observed: Observed, backoff_limit: int) -> None:
    after = {**before, **plan.status}
    old, new = Phase(before.get("phase") or "Pending"), Phase(after["phase"])
    assert new in LEGAL[old], f"{old} -> {new}"
    if old in TERMINAL:
        assert plan.status == {} and plan.create == ()
    assert _true_steps(before) <= _true_steps(after), "a finished step was undone"
    for step, done in PHASE_STEPS.get(new, {}).items():
        assert (step in _true_steps(after)) is done, f"{new} with {step}={not done}"
    existing = {j.name for j in observed.jobs()}
    existing |= {"demo-config"} if observed.config_map else set()
    existing |= {"demo-train"} if observed.service else set()
    names = [m["metadata"]["name"] for m in plan.create]
    assert not existing & set(names), f"creates existing {existing & set(names)}"
    assert len(names) == len(set(names))
    if any(m["metadata"]["labels"].get(LABEL_COMPONENT) == "train" for m in plan.create
           if m["kind"] == "Job"):
        assert "DataPrepared" in _true_steps(after), "training before the data is prepared"
    deleted = {ref.name for ref in plan.delete}
    healthy = {j.name for j in observed.jobs() if not (j.terminating or j.settled)
               and not any(p.failed and not p.terminating for p in j.pods)}
    if healthy & deleted:
        assert new in TERMINAL or new is Phase.SUSPENDED, f"stopped healthy {healthy & deleted}"
    live_train = {j.name for j in observed.train if not j.terminating} - deleted
    live_train |= {m["metadata"]["name"] for m in plan.create
                   if m["metadata"]["labels"].get(LABEL_COMPONENT) == "train" and m["kind"] == "Job"}
    assert len(live_train) <= 1, f"two training attempts at once: {live_train}"
    assert (after.get("attempts") or 0) >= (before.get("attempts") or 0)
    assert (after.get("attempts") or 0) <= backoff_limit + 1
    assert len(after.get("events") or []) <= SETTINGS.events_cap


def body(backoff_limit: int, queue: bool, nodes: int) -> dict[str, Any]:
    spec = {"model": "meta-llama/Llama-3.2-1B", "trainDataPath": "/mnt/kubetune/train.jsonl",
            "registerTo": "main.ml", "backoffLimit": backoff_limit, "globalBatchSize": 16,
            "resources": {"nodes": nodes}, "activeDeadlineSeconds": 20000}
    if queue:
        spec["scheduling"] = {"queueName": "q"}
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": "demo", "namespace": "team", "uid": "u", "generation": 1},
            "spec": spec, "status": {}}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(0, 3), st.booleans(), st.sampled_from([1, 2]))
def test_random_histories_keep_the_invariants(data: st.DataObject, backoff_limit: int,
                                              queue: bool, nodes: int) -> None:
    cluster = Cluster(body(backoff_limit, queue, nodes))
    for _ in range(data.draw(st.integers(1, 60))):
        observed = cluster.observed()
        before = dict(cluster.status)
        plan = decide(cluster.body, observed, cluster.now, SETTINGS)
        check(before, plan, observed, backoff_limit)
        lose_status = data.draw(st.integers(0, 9)) == 0
        cluster.apply(plan, keep_status=not lose_status)
        if plan.delete_run:
            return
        if not lose_status:
            # Level-triggered and idempotent: the same world again asks for nothing.
            again = decide(cluster.body, cluster.observed(), cluster.now, SETTINGS)
            assert again.empty, f"second plan not empty: {again}"
        data.draw(world_move(cluster))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_happy_path_always_ends_registered(data: st.DataObject) -> None:
    """With a world that only makes progress, every run reaches Succeeded."""
    cluster = Cluster(body(backoff_limit=3, queue=data.draw(st.booleans()), nodes=2))
    for _ in range(30):
        plan = decide(cluster.body, cluster.observed(), cluster.now, SETTINGS)
        cluster.apply(plan)
        if cluster.status["phase"] == "Succeeded":
            break
        for name, job in list(cluster.jobs.items()):
            if job.terminating:
                del cluster.jobs[name]
            elif job.suspended:
                cluster.jobs[name] = replace(job, suspended=False)
            elif job.active:
                cluster.jobs[name] = _succeed(job)
            elif not job.done:
                cluster.jobs[name] = data.draw(st.sampled_from([_start, _succeed]))(job)
    assert cluster.status["phase"] == "Succeeded"
    assert cluster.status["registeredModel"]["name"] == "main.ml.demo"
    assert [e["type"] for e in cluster.status["events"]][-1] == "COMPLETED"
