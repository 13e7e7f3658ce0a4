"""Progress for the operator (docs/contracts.md, "Progress protocol"), on rank 0 only.

The same numbers go two ways: Prometheus gauges served over HTTP (the operator scrapes them for
`status.progress`) and `result/progress.json`, rewritten atomically after every batch (read
when no scrape is possible, e.g. local mode).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from .. import contract
from ..results import write_json_atomically


@dataclass
class Snapshot:
    """What rank 0 knows now; `report()` gives it in the contract's shape."""

    percent: float = 0.0
    batches_done: int = 0
    batches_total: int = 0
    tokens_per_second: float = 0.0
    loss: float | None = None
    eta_seconds: float | None = None
    mfu: float | None = None
    latest_checkpoint: str | None = None
    resumed_from: str | None = None
    resume_note: str | None = None
    mlflow: dict[str, str | None] = field(
        default_factory=lambda: {contract.MLFLOW_EXPERIMENT_ID: None, contract.MLFLOW_RUN_ID: None})
    time: float = 0.0

    def report(self) -> dict[str, Any]:
        return {contract.PROGRESS_PERCENT: self.percent, contract.PROGRESS_BATCHES_DONE: self.batches_done,
                contract.PROGRESS_BATCHES_TOTAL: self.batches_total,
                contract.PROGRESS_TOKENS_PER_SECOND: self.tokens_per_second,
                contract.PROGRESS_LOSS: self.loss, contract.PROGRESS_ETA_SECONDS: self.eta_seconds,
                contract.PROGRESS_MFU: self.mfu, contract.PROGRESS_LATEST_CHECKPOINT: self.latest_checkpoint,
                contract.PROGRESS_RESUMED_FROM: self.resumed_from, contract.PROGRESS_RESUME_NOTE: self.resume_note,
                contract.PROGRESS_MLFLOW: dict(self.mlflow),
                contract.PROGRESS_TIME: self.time}


class ProgressMetrics:
    """The gauges, in a registry of their own (one per run, so runs in one process don't clash)."""

    HELP = {
        contract.METRIC_PROGRESS_RATIO: "Fraction of the training duration done (0..1)",
        "kubetune_train_batches_done": "Batches trained",
        "kubetune_train_batches_total": "Batches the run will train (estimated for token durations)",
        "kubetune_train_tokens_per_second": "Training throughput over the last interval, all ranks",
        "kubetune_train_loss": "Latest training loss",
        "kubetune_train_eta_seconds": "Estimated seconds until training ends",
        "kubetune_train_mfu": "Model FLOPs utilisation (0..1) over the last interval",
    }

    def __init__(self):
        self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(name, text, registry=self.registry) for name, text in self.HELP.items()}
        self.info = Gauge(contract.METRIC_INFO, "Where the run's records are (value 1)",
                          list(contract.INFO_LABELS), registry=self.registry)
        self.server = None

    def serve(self, port: int, host: str) -> int:
        self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self.server.server_address[1]

    def update(self, report: dict[str, Any]) -> None:
        """Set the gauges from a report in `progress.json`'s shape (the contract's keys)."""
        values = {contract.METRIC_PROGRESS_RATIO: report[contract.PROGRESS_PERCENT] / 100,
                  **{name: report.get(key) for name, key in contract.METRIC_GAUGES.items()}}
        for name, value in values.items():
            self.gauges[name].set(math.nan if value is None else value)
        mlflow = report[contract.PROGRESS_MLFLOW]
        labels = {contract.INFO_MLFLOW_RUN_ID: mlflow[contract.MLFLOW_RUN_ID],
                  contract.INFO_MLFLOW_EXPERIMENT_ID: mlflow[contract.MLFLOW_EXPERIMENT_ID],
                  contract.INFO_LATEST_CHECKPOINT: report.get(contract.PROGRESS_LATEST_CHECKPOINT),
                  contract.INFO_RESUMED_FROM: report.get(contract.PROGRESS_RESUMED_FROM),
                  contract.INFO_RESUME_NOTE: report.get(contract.PROGRESS_RESUME_NOTE)}
        self.info.clear()  # one label set: the current one
        self.info.labels(**{name: value or "" for name, value in labels.items()}).set(1)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def progress_ratio(state: State) -> float:
    """0..1 of the training duration. Composer counts an `ep` duration in whole epochs, so a
    one-epoch run would sit at 0 until its end: epochs are measured in batches instead."""
    duration = state.max_duration
    if duration is not None and duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        total = int(duration.value) * int(state.dataloader_len)
        return min(1.0, int(state.timestamp.batch) / total) if total > 0 else 0.0
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


def model_flops_utilisation(tokens_per_second: float, flops_per_token: float | None,
                            peak_flops: float | None) -> float | None:
    """Achieved model FLOP/s over the accelerators' dense peak; None where the peak is unknown."""
    if not flops_per_token or not peak_flops:
        return None
    return round(tokens_per_second * flops_per_token / peak_flops, 4)


class Progress(Callback):
    """Rank 0 only: owns the snapshot; the trainer assembly fills in MLflow ids and checkpoints.

    `flops_per_token` and `peak_flops` (all processes together) give the MFU; without either
    (a CPU run) there is none."""

    def __init__(self, progress_file: str | Path, port: int | None, host: str = "0.0.0.0", *,
                 flops_per_token: float | None = None, peak_flops: float | None = None):
        self.file = Path(progress_file)
        self.port, self.host = port, host
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.metrics = ProgressMetrics()
        self.snapshot = Snapshot()
        self.bound_port: int | None = None
        self._last: tuple[float, int] | None = None  # (wall time, tokens) at the previous batch
        self._start = (time.monotonic(), 0.0)  # (wall time, progress ratio) when this attempt began

    # Stored only; published with the next measurement, so nothing is written outside fit().
    def set_mlflow(self, experiment_id: str | None, run_id: str | None) -> None:
        self.snapshot.mlflow = {contract.MLFLOW_EXPERIMENT_ID: experiment_id, contract.MLFLOW_RUN_ID: run_id}

    def set_checkpoint(self, uri: str | None) -> None:
        self.snapshot.latest_checkpoint = uri

    def set_resume(self, checkpoint: str | None, note: str | None) -> None:
        self.snapshot.resumed_from, self.snapshot.resume_note = checkpoint, note

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.port is not None and self.bound_port is None:
            self.bound_port = self.metrics.serve(self.port, self.host)
        self._start = (time.monotonic(), progress_ratio(state))
        self._last = (self._start[0], int(state.timestamp.token))
        self.measure(state, throughput=False)

    def batch_end(self, state: State, logger: Logger) -> None:
        self.measure(state, throughput=True)
        if self.snapshot.mfu is not None:
            logger.log_metrics({"throughput/mfu": self.snapshot.mfu})

    def fit_end(self, state: State, logger: Logger) -> None:
        self.measure(state, throughput=False)

    def close(self, state: State, logger: Logger) -> None:
        self.metrics.close()

    def measure(self, state: State, throughput: bool) -> None:
        now, tokens, ratio = time.monotonic(), int(state.timestamp.token), progress_ratio(state)
        snap = self.snapshot
        snap.batches_done = int(state.timestamp.batch)
        snap.batches_total = total_batches(state, snap.batches_done, ratio)
        snap.percent = round(100 * ratio, 2)
        if throughput and self._last is not None and now > self._last[0]:
            snap.tokens_per_second = round((tokens - self._last[1]) / (now - self._last[0]), 2)
            snap.mfu = model_flops_utilisation(snap.tokens_per_second, self.flops_per_token, self.peak_flops)
        self._last = (now, tokens)
        loss = (state.total_loss_dict or {}).get("loss/train/total")  # already averaged over ranks
        if loss is not None:
            snap.loss = float(loss)
        snap.eta_seconds = self.eta(ratio, now)
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
        report = self.snapshot.report()
        self.metrics.update(report)
        write_json_atomically(self.file, report)
