"""What deleting a TrainingRun does before it goes: stop its steps, then remove its storage.

Owner references let the garbage collector remove every child once the run is gone, but the
files under the run's work_dir would outlive it (and a new run of the same name would resume
from them). So a deleted run, held by the operator's finalizer, first stops any step still
running, so that nothing writes any more, then runs a cleanup Job that removes its work_dir,
and only then lets go. Annotated `kubetune.dev/keep-storage: "true"`, it keeps its files. A run
whose spec is invalid wrote nothing, and goes at once. An operator that
is down meanwhile does all this when it is back: the finalizer waits for it.

`deletion_plan` is pure, like `decide`; `delete_storage` is the thin I/O around it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .api import SpecError, parse_training_run
from .manifests import LABEL_COMPONENT, BuildContext, Component, build_cleanup_job
from .reconcile import ChildRef, JobState, Observed, job_state, observe
from .resolve import ResolveError, resolve_config
from .settings import OperatorSettings

log = logging.getLogger("kubetune.deletion")
KEEP_STORAGE_ANNOTATION = "kubetune.dev/keep-storage"


@dataclass(frozen=True)
class DeletionPlan:
    delete: tuple[ChildRef, ...] = ()
    create: tuple[Mapping[str, Any], ...] = ()
    done: bool = False  # the run may go
    note: str = ""  # what it waits for, or how it ended


def deletion_plan(body: Mapping[str, Any], observed: Observed, cleanup: JobState | None,
                  settings: OperatorSettings) -> DeletionPlan:
    meta = body.get("metadata") or {}
    namespace = meta.get("namespace", "default")
    if (meta.get("annotations") or {}).get(KEEP_STORAGE_ANNOTATION) == "true":
        return DeletionPlan(done=True, note=f"storage kept ({KEEP_STORAGE_ANNOTATION})")
    running = [job for job in observed.jobs() if not job.settled]
    if running:  # stop them first: nothing may write while the folder goes
        stop = tuple(ChildRef("Job", job.name, namespace) for job in running if not job.terminating)
        return DeletionPlan(delete=stop, note=f"stopping {', '.join(j.name for j in running)}")
    if cleanup is not None:
        return _after_cleanup(cleanup, namespace)
    try:
        run = parse_training_run(body)
        # The snapshot names the folder the steps used; a foreground deletion may have removed it.
        config = observed.config or resolve_config(run, settings)
    except (SpecError, ResolveError):
        return DeletionPlan(done=True, note="an invalid spec: nothing was written")
    return DeletionPlan(create=(build_cleanup_job(BuildContext(run, settings, config)),),
                        note=f"removing {config.work_dir}")


def _after_cleanup(cleanup: JobState, namespace: str) -> DeletionPlan:
    if cleanup.done:
        return DeletionPlan(delete=(ChildRef("Job", cleanup.name, namespace, propagation="Background"),),
                            done=True, note="storage removed")
    if cleanup.failed_reason is not None:  # do not hold the deletion forever: say so and go
        return DeletionPlan(done=True, note=f"could not remove the storage: {cleanup.failed_reason} "
                                            f"{cleanup.failed_message}".strip())
    return DeletionPlan(note="removing the storage")


def cleanup_job(children: Mapping[str, list[dict[str, Any]]]) -> JobState | None:
    for job in children.get("jobs") or []:
        if (job["metadata"].get("labels") or {}).get(LABEL_COMPONENT) == Component.CLEANUP.value:
            return job_state(job)
    return None


def delete_storage(cluster, body: Mapping[str, Any], settings: OperatorSettings) -> DeletionPlan:
    """One step of a deleted run's clean-up against `cluster` (see `kubetune.tick.Cluster`)."""
    meta = body["metadata"]
    children = cluster.children(meta["namespace"], meta["name"])
    plan = deletion_plan(body, observe(**children), cleanup_job(children), settings)
    for ref in plan.delete:
        cluster.delete(ref)
    for manifest in plan.create:
        try:
            cluster.create(manifest)
        except Exception as error:
            if "being terminated" not in str(error):
                raise
            # A namespace being deleted takes its volumes along; no Job may start there now.
            plan = DeletionPlan(done=True, note="its namespace is being deleted, its storage with it")
    log.info("deleting %s/%s: %s", meta["namespace"], meta["name"], plan.note)
    return plan
