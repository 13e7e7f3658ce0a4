"""The operator's own Prometheus metrics: runs by phase, reconcile latency and errors."""

from __future__ import annotations

import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from .health import Health, wsgi_app

REGISTRY = CollectorRegistry()
RUNS_BY_PHASE = Gauge("kubetune_trainingruns", "TrainingRuns by namespace and phase",
                      ["namespace", "phase"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("kubetune_reconcile_duration_seconds", "Time of one reconcile",
                              registry=REGISTRY,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
RECONCILE_WAIT_SECONDS = Histogram("kubetune_reconcile_wait_seconds",
                                   "From a change of a run or its child to the start of its reconcile",
                                   registry=REGISTRY,
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
RECONCILE_ERRORS = Counter("kubetune_reconcile_errors_total", "Reconciles that raised",
                           ["reason"], registry=REGISTRY)
EVENTS_DROPPED = Counter("kubetune_events_dropped_total",
                         "Kubernetes Events not posted: too many were waiting (status.events has them)",
                         registry=REGISTRY)
RUN_PHASE = Gauge("kubetune_trainingrun_phase_info", "1 for the current phase of each run",
                  ["namespace", "name", "phase"], registry=REGISTRY)
LEADER = Gauge("kubetune_operator_leader", "1 while this replica holds the Lease and acts, else 0",
               registry=REGISTRY)
RUN_GPUS = Gauge("kubetune_trainingrun_gpus", "GPUs the run's training pods hold (0 outside Training)",
                 ["namespace", "name"], registry=REGISTRY)


_PHASES: dict[tuple[str, str], str] = {}  # (namespace, name) -> phase, of the runs seen alive
_PHASES_LOCK = threading.Lock()


def record_gpus(namespace: str, name: str, phase: str, spec: dict) -> None:
    resources = spec.get("resources") or {}
    held = (resources.get("nodes") or 1) * (resources.get("gpusPerNode") or 0)
    RUN_GPUS.labels(namespace, name).set(held if phase == "Training" else 0)


def record_phase(namespace: str, name: str, phase: str, all_phases: list[str]) -> None:
    for candidate in all_phases:
        RUN_PHASE.labels(namespace, name, candidate).set(1 if candidate == phase else 0)
    with _PHASES_LOCK:
        _PHASES[(namespace, name)] = phase
        recount(_PHASES, all_phases)


def forget_run(namespace: str, name: str, all_phases: list[str]) -> None:
    for candidate in all_phases:
        try:
            RUN_PHASE.remove(namespace, name, candidate)
        except KeyError:
            pass
    try:
        RUN_GPUS.remove(namespace, name)
    except KeyError:
        pass
    with _PHASES_LOCK:
        _PHASES.pop((namespace, name), None)
        recount(_PHASES, all_phases)


def recount(phases_by_run: dict[tuple[str, str], str], all_phases: list[str]) -> None:
    """Runs by phase, recomputed from what is known now (level-triggered, like the rest)."""
    counts: dict[tuple[str, str], int] = {}
    for (namespace, _name), phase in phases_by_run.items():
        counts[(namespace, phase)] = counts.get((namespace, phase), 0) + 1
    RUNS_BY_PHASE.clear()
    for (namespace, phase), count in counts.items():
        RUNS_BY_PHASE.labels(namespace, phase).set(count)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_args) -> None:  # probes every few seconds would flood the log
        pass


def serve(port: int, addr: str = "0.0.0.0", health: Health | None = None) -> None:
    """/metrics (and, given `health`, /healthz and /readyz) on a daemon thread."""
    app = make_wsgi_app(REGISTRY)
    server = make_server(addr, port, wsgi_app(health, app) if health else app,
                         server_class=_ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
