"""The training-duration grammar: a positive integer and a unit, `1ep`, `1000000tok`, `500ba`.

Shared by the API validation, the CRD's CEL rule and the progress display, so the three never
disagree about what a duration is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

# No leading zeros and no zero: a zero-length run is always a mistake.
DURATION_PATTERN = r"^[1-9][0-9]*(ep|tok|ba)$"
_DURATION_RE = re.compile(DURATION_PATTERN)


class Unit(str, Enum):
    EPOCH = "ep"
    TOKEN = "tok"
    BATCH = "ba"


@dataclass(frozen=True)
class Duration:
    value: int
    unit: Unit

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ValueError(f"a duration must be positive, got {self.value}")

    def __str__(self) -> str:
        return f"{self.value}{self.unit.value}"


def is_duration(text: str) -> bool:
    return _DURATION_RE.fullmatch(text) is not None


def parse(text: str) -> Duration:
    """`'3ep'` -> `Duration(3, Unit.EPOCH)`; ValueError on anything outside the grammar."""
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"must be <N>ep, <N>tok or <N>ba with N >= 1 (e.g. 1ep, 1000000tok), got {text!r}")
    unit = Unit(match.group(1))
    return Duration(int(text[: -len(unit.value)]), unit)


def format_duration(duration: Duration) -> str:
    return str(duration)
