"""The pure core of the operator: observe → decide → apply. Nothing here does I/O.

One tick, as both shells run it (`kubetune.tick.reconcile`; the kopf shell's `Cluster` reads
watch-fed copies of the children, local mode's `LocalCluster` its processes):

    children = cluster.children(namespace, name)          # Jobs, Pods, ConfigMaps, Services
    observed = observe(**children)                          # the facts: JobState, PodState, snapshot
    url = progress_url(observed, settings)                  # rank 0 of the live attempt, if it runs
    report = progress.progress(uid, url)                    # scraped at most once per interval
    observed = observe(**children, progress=report)
    plan = decide(run, observed, now, settings)             # the whole status again, and what to do
    for ref in plan.delete: cluster.delete(ref)             # then plan.create,
    cluster.patch_status(namespace, name, plan.status)      # only the keys that changed,
    for event in plan.events: cluster.post_event(...)       # the mirrors of status.events
"""

from .decide import decide
from .observe import (
    Failure,
    JobState,
    Observed,
    PodState,
    job_failure,
    job_state,
    observe,
    parse_metrics,
    parse_termination_message,
    pod_state,
    progress_url,
)
from .plan import ChildRef, Plan, PlannedEvent
from .status import CONDITION_TYPES

__all__ = [
    "CONDITION_TYPES", "ChildRef", "Failure", "JobState", "Observed", "Plan", "PlannedEvent",
    "PodState", "decide", "job_failure", "job_state", "observe", "parse_metrics",
    "parse_termination_message", "pod_state", "progress_url",
]
