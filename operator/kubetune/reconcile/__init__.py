"""The pure core of the operator: observe → decide → apply.

A shell (the kopf handlers, or local mode) gathers what exists into an `Observed`, calls
`decide(body, observed, now, settings)`, and applies the returned `Plan`. Nothing here does I/O.
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
