"""What a preparation found: statistics per split and the problems, capped for the report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataValidationFailed
from .records import Location, Problem


@dataclass(frozen=True)
class DataStats:
    samples: int
    tokens: int
    truncated_samples: int
    sequences: int
    packing_efficiency: float
    dropped_samples: int = 0  # valid records left with no token to learn after truncation

    def to_result(self) -> dict[str, Any]:
        """camelCase, as the result document and the TrainingRun status carry them."""
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "truncatedSamples": self.truncated_samples,
            "droppedSamples": self.dropped_samples,
            "sequences": self.sequences,
            "packingEfficiency": self.packing_efficiency,
        }

    @classmethod
    def from_result(cls, fields: dict[str, Any]) -> "DataStats":
        return cls(fields["samples"], fields["tokens"], fields["truncatedSamples"],
                   fields["sequences"], fields["packingEfficiency"], fields.get("droppedSamples", 0))


@dataclass
class SplitReport:
    """One split (train or eval): its source, stats, and the first problems found."""

    split: str
    source: str
    stats: DataStats | None = None
    problems: list[Problem] = field(default_factory=list)  # at most the report's cap
    invalid_records: int = 0
    dropped_where: list[Location] = field(default_factory=list)  # the first dropped samples

    def add_problem(self, problem: Problem, cap: int) -> None:
        self.invalid_records += 1
        if len(self.problems) < cap:
            self.problems.append(problem)


@dataclass
class PrepReport:
    """The outcome of `analyze`: what `kubetune validate` prints and `prepare` records."""

    context_length: int
    train: SplitReport
    eval: SplitReport | None = None
    max_reported: int = 20

    @property
    def stats(self) -> DataStats | None:
        """The train split's statistics (what `kubetune validate` prints)."""
        return self.train.stats

    @property
    def splits(self) -> list[SplitReport]:
        return [self.train] + ([self.eval] if self.eval else [])

    @property
    def invalid_records(self) -> int:
        return sum(split.invalid_records for split in self.splits)

    @property
    def ok(self) -> bool:
        return self.invalid_records == 0

    def problems(self) -> list[Problem]:
        return [problem for split in self.splits for problem in split.problems][: self.max_reported]

    def batches_per_epoch(self, global_batch_size: int) -> int:
        """Optimizer steps per pass over the train sequences (a last partial batch counts)."""
        return math.ceil(self.train.stats.sequences / global_batch_size) if self.train.stats else 0

    def result_fields(self) -> dict[str, Any]:
        fields = {"dataStats": self.train.stats.to_result()}
        if self.eval and self.eval.stats:
            fields["evalDataStats"] = self.eval.stats.to_result()
        return fields

    def failure_message(self) -> str:
        shown = self.problems()
        count = f"{self.invalid_records} invalid record(s)"
        lines = [f"{count}:" if len(shown) == self.invalid_records else f"{count}; first {len(shown)}:"]
        return "\n".join(lines + [f"  {problem}" for problem in shown])


class PrepFailed(DataValidationFailed):
    """DataValidationFailed carrying the full report, for callers that render it themselves."""

    def __init__(self, report: PrepReport):
        super().__init__(report.failure_message())
        self.report = report
