"""The API's two time formats, written in one place: RFC 3339 to the second (status, events,
pods) and MicroTime (Lease renewals)."""

from __future__ import annotations

from datetime import datetime, timezone


def timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def now_iso() -> str:
    return timestamp(datetime.now(timezone.utc))
