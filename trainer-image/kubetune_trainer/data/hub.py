"""Names of models and datasets: a local folder, or a hub id.

Is the hub usable? Asked before loading a name that is no local folder: offline
(HF_HUB_OFFLINE=1) or with no hub reachable, the libraries would retry for a minute and end in
a transient error; we load from the local cache alone and fail in seconds, saying so."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_SECONDS = 3.0
TRUE = ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


@functools.lru_cache(maxsize=8)
def reachable(url: str) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=CONNECT_SECONDS):
            return True
    except OSError:
        return False


def offline_reason() -> str | None:
    """Why only the local cache can serve a hub name, or None when the hub answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:
        return "the hub is off (HF_HUB_OFFLINE=1)"
    if not reachable(endpoint()):
        return f"no hub is reachable at {endpoint()}"
    return None


def cache_folder() -> str:
    return os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")


def relative_note(path: str) -> str:
    """How a relative path was looked up, for messages: a run file used from another folder
    otherwise fails with no hint why."""
    if "://" in path or os.path.isabs(path) or path.startswith("~"):
        return ""
    return f" (a relative path, looked up from the working directory {os.getcwd()})"
