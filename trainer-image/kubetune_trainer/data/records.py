"""What readers yield and validators report: a raw record with its location, or a problem."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Location:
    """Where a record came from: a file and line, a file alone, or a table/dataset and row."""

    source: str
    line: int | None = None  # 1-based line or row; None when the whole file is the record

    def __str__(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Record:
    """One record before validation: a JSON value (IFT, chat) or a text (CPT), or Unreadable."""

    location: Location
    value: Any


@dataclass(frozen=True)
class Problem:
    """One broken rule at one location; printed as `file:line: rule`."""

    location: Location
    rule: str

    def __str__(self) -> str:
        return f"{self.location}: {self.rule}"


class Unreadable(Exception):
    """A record that cannot even be parsed (bad JSON, bad encoding); readers yield these as
    records' values so that validation reports them in order with the others."""

    def __init__(self, rule: str):
        super().__init__(rule)
        self.rule = rule
