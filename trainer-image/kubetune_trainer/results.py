"""How a step tells its outcome: a small JSON document and an exit code.

In a pod the document goes to the container's termination message (`/dev/termination-log`,
at most 4 KiB), which the operator reads from the pod status; `KUBETUNE_TERMINATION_LOG`
overrides the path (local mode and the test node agent). Exit codes: 0 done, 2 permanent
(user error, never retried), 1 anything else (retried up to `backoffLimit`).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from .contract import (ENV_TERMINATION_LOG, EXIT_PERMANENT, EXIT_RETRYABLE, MAX_RESULT_BYTES, RESULT_MESSAGE,
                       RESULT_OK, RESULT_PERMANENT, RESULT_REASON, RESULT_STEP, TERMINATION_LOG)
from .errors import StepError


def termination_log_path() -> Path | None:
    override = os.environ.get(ENV_TERMINATION_LOG)
    if override:
        return Path(override)
    # The kubelet mounts this one file, writable, into the container; its folder (/dev) is not
    # the container user's to write. Outside a pod the file does not exist: nothing is written.
    default = Path(TERMINATION_LOG)
    return default if os.access(default, os.W_OK) else None


def fit(document: dict[str, Any], limit: int = MAX_RESULT_BYTES) -> str:
    """Serialise, shortening the message (never the keys) until it fits the kubelet's limit."""
    text = json.dumps(document, sort_keys=True)
    while len(text.encode()) > limit and document.get(RESULT_MESSAGE):
        message = document[RESULT_MESSAGE]
        document = {**document, RESULT_MESSAGE: message[: max(0, len(message) // 2 - 3)] + "..."}
        text = json.dumps(document, sort_keys=True)
    return text


def write_json_atomically(path: Path, document: dict[str, Any], indent: int | None = None) -> None:
    """A reader sees the old document or the new one, never half of one. The temporary name is
    unique across pods: several may write beside each other on shared storage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(json.dumps(document, indent=indent, sort_keys=True))
    os.replace(temp, path)


def write_result(step: str, ok: bool, **fields: Any) -> dict[str, Any]:
    document = {RESULT_STEP: step, RESULT_OK: ok, **fields}
    path = termination_log_path()
    if path is not None:
        path.write_text(fit(document))
    return document


def failure(step: str, error: StepError) -> dict[str, Any]:
    return write_result(step, False, **{RESULT_REASON: error.reason, RESULT_MESSAGE: error.message,
                                        RESULT_PERMANENT: error.permanent})


def exit_code(error: StepError) -> int:
    return EXIT_PERMANENT if error.permanent else EXIT_RETRYABLE
