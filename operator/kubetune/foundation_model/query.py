"""Which runs `list(...)` returns: the service's filters, applied to runs already fetched (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidArgumentsError
from .types import RunStatus, TrainingRun


@dataclass(frozen=True)
class Filters:
    names: frozenset[str] | None = None
    experiment_id: str | None = None
    statuses: frozenset[RunStatus] | None = None
    owners: frozenset[str] | None = None
    before: datetime | None = None  # created strictly before
    after: datetime | None = None  # created at or after
    limit: int | None = None

    @classmethod
    def from_arguments(cls, *, training_runs: Iterable[Any] | None = None, experiment_id: str | None = None,
                       statuses: Iterable[str | RunStatus] | None = None,
                       user_emails: Iterable[str] | None = None, before: str | datetime | None = None,
                       after: str | datetime | None = None, limit: int | None = None) -> Filters:
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise InvalidArgumentsError(f"limit must be a positive integer or None, got {limit!r}")
        return cls(
            names=frozenset(getattr(r, "name", r) for r in training_runs) if training_runs else None,
            experiment_id=experiment_id or None,
            statuses=frozenset(map(parse_status, statuses)) if statuses else None,
            owners=frozenset(user_emails) if user_emails else None,
            before=parse_moment(before, "before"), after=parse_moment(after, "after"), limit=limit)

    def admits(self, run: TrainingRun) -> bool:
        created = run.created_at
        return ((self.names is None or run.name in self.names)
                and (self.experiment_id is None or run.experiment_id == self.experiment_id)
                and (self.statuses is None or run.status in self.statuses)
                and (self.owners is None or run.created_by in self.owners)
                and (self.before is None or (created is not None and created < self.before))
                and (self.after is None or (created is not None and created >= self.after)))


def parse_status(value: str | RunStatus) -> RunStatus:
    status = RunStatus.from_string(value)
    if status is RunStatus.UNKNOWN and str(value).strip().upper() != "UNKNOWN":
        names = ", ".join(s.value for s in RunStatus)
        raise InvalidArgumentsError(f"unknown status {value!r}: statuses are {names}")
    return status


def parse_moment(value: str | datetime | None, argument: str) -> datetime | None:
    """A datetime or ISO 8601 text; without a zone it is local time, as the service took it."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgumentsError(
                f"{argument} must be a datetime or ISO 8601 text such as 2024-05-01 or"
                f" 2024-05-01T12:00:00Z, got {value!r}") from None
    if not isinstance(value, datetime):
        raise InvalidArgumentsError(f"{argument} must be a datetime or ISO 8601 text, got {value!r}")
    return value.astimezone(timezone.utc) if value.tzinfo else value.astimezone().astimezone(timezone.utc)


def select(runs: Iterable[TrainingRun], filters: Filters) -> list[TrainingRun]:
    """The runs the filters admit, newest first, at most `limit`."""
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    chosen = sorted((r for r in runs if filters.admits(r)), key=lambda r: r.created_at or epoch, reverse=True)
    return chosen[: filters.limit] if filters.limit is not None else chosen
