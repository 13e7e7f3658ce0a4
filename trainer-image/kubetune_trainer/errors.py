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


def user_error_of(error: BaseException) -> UserError | None:
    """A library's exception that is the user's to fix, as a UserError saying how; else None."""
    try:
        from botocore.exceptions import NoCredentialsError
    except ImportError:  # no object-store support installed: nothing of it can have failed
        return None
    if isinstance(error, NoCredentialsError):
        return UserError(
            "no object-store credentials for an s3:// path: name a Secret holding AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY in spec.secrets.objectStore (locally: export them)",
            "MissingCredentials",
        )
    return None

