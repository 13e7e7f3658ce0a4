"""`kubetune operator`: leader election, metrics, then kopf with the handlers of this package."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import kopf

from .. import metrics
from ..settings import OperatorSettings
from . import handlers
from .cluster import Cluster

log = logging.getLogger("kubetune.operator")


@dataclass(frozen=True)
class RuntimeOptions:
    """How this process runs (not what runs look like: that is OperatorSettings)."""

    namespaces: tuple[str, ...] = ()  # empty: cluster-wide
    interval: float = 5.0
    metrics_port: int = 8080
    leader_election: bool = True
    lease_namespace: str = "default"
    lease_name: str = "kubetune-operator"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RuntimeOptions:
        env = os.environ if environ is None else environ
        namespaces = tuple(n for n in env.get("KUBETUNE_WATCH_NAMESPACES", "").split(",") if n)
        return cls(
            namespaces=namespaces,
            interval=float(env.get("KUBETUNE_RECONCILE_INTERVAL", "5")),
            metrics_port=int(env.get("KUBETUNE_OPERATOR_METRICS_PORT", "8080")),
            leader_election=env.get("KUBETUNE_LEADER_ELECTION", "true").lower() != "false",
            lease_namespace=env.get("POD_NAMESPACE") or env.get("KUBETUNE_LEASE_NAMESPACE", "default"),
        )


def load_kube_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def configure_kopf(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping out of .status (which is ours and schema-checked) and sessions
    # short so an API-server restart is noticed within seconds.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.kubetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.kubetune.dev")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.networking.request_timeout = 30
    # A run deleted by its own reconcile (ttlSecondsAfterFinished) finds its timer still running;
    # kopf would wait 60 s before looking again and only then release its finalizer.
    settings.background.instant_exit_timeout = 5
    settings.background.cancellation_polling = 1


def elect(options: RuntimeOptions, stop: threading.Event):
    from kubernetes import client

    from ..leader import LeaseElector

    identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    elector = LeaseElector(client.CoordinationV1Api(), options.lease_namespace, options.lease_name, identity)
    if not elector.acquire(stop):
        return None
    threading.Thread(target=elector.keep_renewing, args=(stop,), daemon=True).start()
    return elector


def run_operator(options: RuntimeOptions | None = None) -> int:
    logging.basicConfig(level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options or RuntimeOptions.from_env()
    settings = OperatorSettings.from_env()
    load_kube_config()
    metrics.serve(options.metrics_port)
    stop = threading.Event()
    elector = elect(options, stop) if options.leader_election else None
    if options.leader_election and elector is None:
        return 1
    kopf_stop = threading.Event()
    if elector is not None:  # leadership lost: stop acting at once, let the Deployment restart us
        threading.Thread(target=lambda: (elector.lost.wait(), kopf_stop.set()), daemon=True).start()
    kopf.on.startup()(configure_kopf)
    handlers.register(settings, options.interval)
    log.info("kubetune operator: watching %s", ", ".join(options.namespaces) or "all namespaces")

    async def run_kopf() -> None:
        try:
            await kopf.operator(
                standalone=True,  # leader election above replaces kopf's peering
                clusterwide=not options.namespaces,
                namespaces=list(options.namespaces),
                stop_flag=kopf_stop,
                memo=kopf.Memo(cluster=Cluster(), quiet=handlers.QuietRuns()),
            )
        finally:
            # kopf waits for a threading stop flag in an executor thread; when it stopped for
            # another reason (SIGTERM), that thread would block asyncio.run's exit forever.
            kopf_stop.set()

    asyncio.run(run_kopf())
    stop.set()
    if elector is not None and not elector.lost.is_set():
        elector.release()  # a rolling update's next replica leads at once, not after the lease
    return 1 if elector is not None and elector.lost.is_set() else 0
