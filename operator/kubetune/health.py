"""The operator's `/healthz` (liveness) and `/readyz` (readiness), served beside `/metrics`.

- `/readyz` is 200 once the replica can do its part: a standby has read the Lease through the
  API server (so it can take over), the leader has started kopf. Standbys are Ready so that
  `kubectl rollout status` and `helm --wait` finish with `replicas > 1`; which replica acts is
  the `kubetune_operator_leader` gauge.
- `/healthz` is 200 unless the replica is stuck: the acting replica's event loop must have beaten
  within `stale_s`, and a replica that lost its Lease reports unhealthy (it is about to exit). A
  standby waiting for the Lease is healthy: restarting it would change nothing.

`Health` is pure state behind a lock; `wsgi_app` puts it in front of the metrics app.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

STARTING, STANDBY, LEADING, LOST = "starting", "standby", "leading", "lost"


class Health:
    def __init__(self, stale_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.stale_s, self.clock = stale_s, clock
        self.role, self.kopf_started, self.last_beat = STARTING, False, None
        self._lock = threading.Lock()

    def _set(self, **fields: Any) -> None:
        with self._lock:
            for key, value in fields.items():
                setattr(self, key, value)

    def standby(self) -> None:
        """Waiting for the Lease, which it has read (the API server answers)."""
        self._set(role=STANDBY)

    def leading(self) -> None:
        self._set(role=LEADING, last_beat=self.clock())

    def lost(self) -> None:
        self._set(role=LOST)

    def started(self) -> None:
        self._set(kopf_started=True)

    def beat(self) -> None:
        self._set(last_beat=self.clock())

    def live(self) -> tuple[bool, str]:
        with self._lock:
            if self.role == LOST:
                return False, "lost the leader Lease; exiting"
            if self.role != LEADING:
                return True, f"{self.role}: waiting for the leader Lease"
            age = self.clock() - (self.last_beat or 0.0)
            if age > self.stale_s:
                return False, f"the event loop has not run for {age:.0f}s"
            return True, "leading"

    def ready(self) -> tuple[bool, str]:
        alive, why = self.live()
        with self._lock:
            if alive and self.role == LEADING and not self.kopf_started:
                return False, "leading; kopf is starting"
            return alive and self.role in (LEADING, STANDBY), why


def wsgi_app(health: Health, metrics_app: Callable) -> Callable:
    """`/healthz` and `/readyz` from `health`, everything else from the Prometheus app."""
    checks = {"/healthz": health.live, "/readyz": health.ready}

    def app(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics_app(environ, start_response)
        ok, why = check()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{why}\n".encode()]

    return app
