"""The run timeline (`timeline.py`) from API objects, without a cluster."""

from __future__ import annotations

from .timeline import format_timeline, log_marks, pod_marks, run_marks


def test_a_pods_marks_follow_its_conditions_and_container_states_and_its_log_lines():
    pod = {"metadata": {"name": "r-train-1-0", "creationTimestamp": "2026-12-01T10:00:00Z"},
           "status": {"conditions": [
               {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T10:00:01Z"},
               {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": "2026-12-01T10:00:03Z"},
               {"type": "Ready", "status": "False", "lastTransitionTime": "2026-12-01T10:00:40Z"}],
               "containerStatuses": [{"name": "train", "state": {"terminated": {
                   "startedAt": "2026-12-01T10:00:04Z", "finishedAt": "2026-12-01T10:00:40Z", "exitCode": 0}}}]}}
    log = ("2026-12-01T10:00:19.500000000Z starting\n"
           "2026-12-01T10:00:30.000000000Z middle\n2026-12-01T10:00:39.250000000Z done\n")
    run = {"metadata": {"creationTimestamp": "2026-12-01T09:59:58Z"},
           "status": {"events": [{"type": "CREATED", "time": "2026-12-01T09:59:59Z", "message": "x"}]}}
    marks = sorted(run_marks(run) + pod_marks(pod) + log_marks("r-train-1-0", log))
    start = marks[0][0]
    assert [(t - start, what.split(":")[0]) for t, what in marks] == [
        (0.0, "run created"), (1.0, "event CREATED"), (2.0, "pod r-train-1-0 created"),
        (3.0, "pod r-train-1-0 scheduled"), (5.0, "pod r-train-1-0 sandbox ready"),
        (6.0, "pod r-train-1-0 train started"), (21.5, "pod r-train-1-0 first log line"),
        (41.25, "pod r-train-1-0 last log line"), (42.0, "pod r-train-1-0 train finished (exit 0)")]
    text = format_timeline([(t - start, what) for t, what in marks])
    assert "   21.5s  + 15.5  pod r-train-1-0 first log line: starting" in text


def test_an_empty_or_untimestamped_log_gives_no_marks():
    assert log_marks("p", "") == [] and log_marks("p", "no stamp here\n") == []
    assert log_marks("p", "2026-12-01 15:33:00,937 INFO a logger's own time\n") == []
