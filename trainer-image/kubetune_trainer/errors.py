"""Errors the steps raise, classified so the operator knows whether a retry can help."""

from __future__ import annotations


class StepError(Exception):
    """A failure with a CamelCase reason and a message for a person (no secrets, no traceback)."""

    reason = "StepFailed"
    permanent = False  # True: the input is wrong, retrying cannot help

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class UserError(StepError):
    """Bad input: a wrong path, a malformed file, an unsupported model. Never retried."""

    reason = "InvalidInput"
    permanent = True


class DataValidationFailed(UserError):
    reason = "DataValidationFailed"


class TransientError(StepError):
    """Network, storage or tracking-server trouble: the step may succeed when retried."""

    reason = "TransientError"
