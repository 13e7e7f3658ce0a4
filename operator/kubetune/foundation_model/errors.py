"""The errors a user of the SDK can cause, one type each, every message saying what to do.

All derive from `FoundationModelError`, so `except fm.FoundationModelError` catches everything
the SDK raises on purpose; no `kubernetes.client.ApiException` reaches a caller.
"""

from __future__ import annotations


class FoundationModelError(Exception):
    """Base of every error the SDK raises; `str(error)` is the whole message."""

    exit_code = 1  # what `kubetune` leaves with when this error ends a command


class NoClusterError(FoundationModelError):
    """No Kubernetes API server to talk to: no kubeconfig and not in a pod, or it cannot be reached."""

    exit_code = 4


class CrdNotInstalledError(FoundationModelError):
    """The API server does not serve TrainingRuns: the kubetune CRD is not installed there."""

    exit_code = 4


class PermissionDeniedError(FoundationModelError):
    """The API server refused the credentials, or they lack a right on trainingruns in that namespace."""

    exit_code = 5


class RunNotFoundError(FoundationModelError, LookupError):
    """No TrainingRun of that name in that namespace."""

    exit_code = 3


class InvalidArgumentsError(FoundationModelError, ValueError):
    """Arguments that make no valid TrainingRun, or a call that contradicts itself; nothing was created or changed."""

    exit_code = 1
