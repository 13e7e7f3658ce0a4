"""How a step tells its outcome: a small JSON document and an exit code.

In a pod the document goes to the container's termination message (`/dev/termination-log`,
at most 4 KiB), which the operator reads from the pod status; `KUBETUNE_TERMINATION_LOG`
overrides the path (local mode and the test node agent). Exit codes: 0 done, 2 permanent
(user error, never retried), 1 anything else (retried up to `backoffLimit`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import StepError

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_PERMANENT = 2
TERMINATION_LOG = "/dev/termination-log"
MAX_MESSAGE_BYTES = 4096


def termination_log_path() -> Path | None:
    override = os.environ.get("KUBETUNE_TERMINATION_LOG")
    if override:
        return Path(override)
    default = Path(TERMINATION_LOG)
    return default if default.parent.exists() and os.access(default.parent, os.W_OK) else None


def fit(document: dict[str, Any], limit: int = MAX_MESSAGE_BYTES) -> str:
    """Serialise, shortening the message (never the keys) until it fits the kubelet's limit."""
    text = json.dumps(document, sort_keys=True)
    while len(text.encode()) > limit and document.get("message"):
        message = document["message"]
        document = {**document, "message": message[: max(0, len(message) // 2 - 3)] + "..."}
        text = json.dumps(document, sort_keys=True)
    return text


def write_result(step: str, ok: bool, **fields: Any) -> dict[str, Any]:
    document = {"step": step, "ok": ok, **fields}
    path = termination_log_path()
    if path is not None:
        path.write_text(fit(document))
    return document


def failure(step: str, error: StepError) -> dict[str, Any]:
    return write_result(step, False, reason=error.reason, message=error.message,
                        permanent=error.permanent)


def exit_code(error: StepError) -> int:
    return EXIT_PERMANENT if error.permanent else EXIT_RETRYABLE
