"""Progress for the operator (docs/contracts.md, "Progress protocol"), on rank 0 only.

The same numbers go two ways: Prometheus gauges served over HTTP (the operator scrapes them for
`status.progress`) and `result/progress.json`, rewritten atomically after every batch (read
when no scrape is possible, e.g. local mode).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger
from prometheus_client import CollectorRegistry, Gauge, start_http_server


@dataclass
class Snapshot:
    percent: float = 0.0
    batchesDone: int = 0
    batchesTotal: int = 0
    tokensPerSecond: float = 0.0
    loss: float | None = None
    etaSeconds: float | None = None
    latestCheckpoint: str | None = None
    mlflow: dict[str, str | None] = field(default_factory=lambda: {"experimentId": None, "runId": None})
    time: float = 0.0


class ProgressMetrics:
    """The gauges, in a registry of their own (one per run, so runs in one process don't clash)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        names = {
            "progress_ratio": "Fraction of the training duration done (0..1)",
            "batches_done": "Batches trained",
            "batches_total": "Batches the run will train (estimated for token durations)",
            "tokens_per_second": "Training throughput over the last interval, all ranks",
            "loss": "Latest training loss",
            "eta_seconds": "Estimated seconds until training ends",
        }
        self.gauges = {name: Gauge(f"kubetune_train_{name}", text, registry=self.registry)
                       for name, text in names.items()}
        self.info = Gauge("kubetune_train_info", "Where the run's records are (value 1)",
                          ["mlflow_run_id", "mlflow_experiment_id", "latest_checkpoint"],
                          registry=self.registry)
        self.server = None

    def serve(self, port: int, host: str) -> int:
        self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self.server.server_address[1]

    def update(self, snap: Snapshot) -> None:
        values = {"progress_ratio": snap.percent / 100, "batches_done": snap.batchesDone,
                  "batches_total": snap.batchesTotal, "tokens_per_second": snap.tokensPerSecond,
                  "loss": snap.loss, "eta_seconds": snap.etaSeconds}
        for name, value in values.items():
            self.gauges[name].set(math.nan if value is None else value)
        self.info.clear()  # one label set: the current one
        self.info.labels(snap.mlflow["runId"] or "", snap.mlflow["experimentId"] or "",
                         snap.latestCheckpoint or "").set(1)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(document, sort_keys=True))
    os.replace(temp, path)


def elapsed_ratio(state: State) -> float:
    elapsed = state.get_elapsed_duration()
    return min(1.0, float(elapsed.value)) if elapsed is not None else 0.0


def total_batches(state: State, batches_done: int, ratio: float) -> int:
    """Exact for `ep`/`ba` durations; for `tok` extrapolated from the progress so far."""
    duration = state.max_duration
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        return int(duration.value) * int(state.dataloader_len)
    return max(batches_done, round(batches_done / ratio)) if ratio > 0 else 0


class Progress(Callback):
    """Rank 0 only: owns the snapshot; the trainer assembly fills in MLflow ids and checkpoints."""

    def __init__(self, progress_file: str | Path, port: int | None, host: str = "0.0.0.0"):
        self.file = Path(progress_file)
        self.port, self.host = port, host
        self.metrics = ProgressMetrics()
        self.snapshot = Snapshot()
        self.bound_port: int | None = None
        self._last: tuple[float, int] | None = None  # (wall time, tokens) at the previous batch
        self._start = (time.monotonic(), 0.0)  # (wall time, progress ratio) when this attempt began

    # Stored only; published with the next measurement, so nothing is written outside fit().
    def set_mlflow(self, experiment_id: str | None, run_id: str | None) -> None:
        self.snapshot.mlflow = {"experimentId": experiment_id, "runId": run_id}

    def set_checkpoint(self, uri: str | None) -> None:
        self.snapshot.latestCheckpoint = uri

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.port is not None and self.bound_port is None:
            self.bound_port = self.metrics.serve(self.port, self.host)
        self._start = (time.monotonic(), elapsed_ratio(state))
        self._last = (self._start[0], int(state.timestamp.token))
        self.measure(state, throughput=False)

    def batch_end(self, state: State, logger: Logger) -> None:
        self.measure(state, throughput=True)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.measure(state, throughput=False)

    def close(self, state: State, logger: Logger) -> None:
        self.metrics.close()

    def measure(self, state: State, throughput: bool) -> None:
        now, tokens, ratio = time.monotonic(), int(state.timestamp.token), elapsed_ratio(state)
        snap = self.snapshot
        snap.batchesDone = int(state.timestamp.batch)
        snap.batchesTotal = total_batches(state, snap.batchesDone, ratio)
        snap.percent = round(100 * ratio, 2)
        if throughput and self._last is not None and now > self._last[0]:
            snap.tokensPerSecond = round((tokens - self._last[1]) / (now - self._last[0]), 2)
        self._last = (now, tokens)
        loss = (state.total_loss_dict or {}).get("loss/train/total")  # already averaged over ranks
        if loss is not None:
            snap.loss = float(loss)
        snap.etaSeconds = self.eta(ratio, now)
        self.publish()

    def eta(self, ratio: float, now: float) -> float | None:
        # This attempt's pace: a resumed run starts at ratio > 0 and its wall clock at 0.
        if ratio >= 1.0:
            return 0.0
        started, start_ratio = self._start
        if ratio <= start_ratio:
            return None
        # Milliseconds kept: a tiny run's batches take ~10 ms, and 0.0 would read as "done".
        return round((now - started) / (ratio - start_ratio) * (1.0 - ratio), 3)

    def publish(self) -> None:
        self.snapshot.time = time.time()
        self.metrics.update(self.snapshot)
        write_json_atomically(self.file, asdict(self.snapshot))
