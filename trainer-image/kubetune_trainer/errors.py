"""Errors the steps raise, classified so the operator knows whether a retry can help."""

from __future__ import annotations

import errno
import os


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


class NoCUDADevice(StepError):
    """A GPU pod with no CUDA device (driver or device plugin broken on its node). Retried: the next
    attempt may land on a working node."""

    reason = "NoCUDADevice"


class StorageFull(StepError):
    """No space left where the run writes. Retrying on the same full volume fails the same way."""

    reason = "StorageFull"
    permanent = True


# How a full disk surfaces: OSError from Python's writes, RuntimeError from torch.save's writer.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TORCH_WRITE_FAILED = ("file write failed", "unexpected pos")


CHECKPOINTS_KEPT = ("the checkpoints saved before are kept: free space or enlarge the volume, then run "
                    "again to resume from the newest whole checkpoint")
SAVED_KEPT = "what was saved before is kept: free space or enlarge the volume, then run again"


def storage_full(error: BaseException, folder: str, shown_as: str | None = None,
                 advice: str = CHECKPOINTS_KEPT) -> StorageFull | None:
    """A StorageFull naming `folder` (or `shown_as`), if `error` or its cause is a full disk there."""
    seen: BaseException | None = error
    while seen is not None:
        no_space = isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS
        torch_write = isinstance(seen, RuntimeError) and any(m in str(seen) for m in TORCH_WRITE_FAILED)
        if no_space or (torch_write and _nearly_full(folder)):
            cause = seen.strerror if no_space else "a checkpoint write failed"
            return StorageFull(f"no space left on the storage of {shown_as or folder} ({cause}); {advice}")
        seen = seen.__cause__ or seen.__context__
    return None


def _nearly_full(folder: str, margin: int = 64 * 2**20) -> bool:
    """torch's writer does not say why a write failed: ask the filesystem."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < margin
