"""`kubetune operator`: leader election, metrics, the children's informer, then kopf with the
handlers of this package."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import kopf

from .. import metrics
from ..health import Health
from ..settings import OperatorSettings
from ..tick import ProgressReader
from . import handlers
from .cluster import Cluster, EventPoster
from .informer import ChildInformer
from .memory import fix_mmap_threshold, limit_malloc_arenas

log = logging.getLogger("kubetune.operator")


@dataclass(frozen=True)
class RuntimeOptions:
    """How this process runs (not what runs look like: that is OperatorSettings)."""

    namespaces: tuple[str, ...] = ()  # empty: cluster-wide
    interval: float = 60.0  # resync: a run is reconciled at least this often without a change
    # Threads that reconcile a change. Each tick's API writes block one for the API server's
    # latency (0.5 s on a busy server): 16 capped a burst of 200 new runs at ~6 first ticks a
    # second. As many again patch statuses beside them; a quarter as many run the timers' ticks.
    workers: int = 32
    metrics_port: int = 8080
    metrics_addr: str = "0.0.0.0"
    leader_election: bool = True
    lease_namespace: str = "default"
    lease_name: str = "kubetune-operator"
    lease_create: bool = True  # false: the installer made the Lease (the chart does)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RuntimeOptions:
        env = os.environ if environ is None else environ
        namespaces = tuple(n for n in env.get("KUBETUNE_WATCH_NAMESPACES", "").split(",") if n)
        return cls(
            namespaces=namespaces,
            interval=float(env.get("KUBETUNE_RECONCILE_INTERVAL", "60")),
            workers=int(env.get("KUBETUNE_RECONCILE_WORKERS", "32")),
            metrics_port=int(env.get("KUBETUNE_OPERATOR_METRICS_PORT", "8080")),
            metrics_addr=env.get("KUBETUNE_OPERATOR_METRICS_ADDR") or "0.0.0.0",
            leader_election=env.get("KUBETUNE_LEADER_ELECTION", "true").lower() != "false",
            lease_namespace=env.get("POD_NAMESPACE") or env.get("KUBETUNE_LEASE_NAMESPACE", "default"),
            lease_name=env.get("KUBETUNE_LEASE_NAME") or "kubetune-operator",
            lease_create=env.get("KUBETUNE_LEASE_CREATE", "true").lower() != "false",
        )


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def load_kube_config() -> None:
    from kubernetes import config
    from kubernetes.config.incluster_config import InClusterConfigLoader

    # The chart names the token's folder (KUBETUNE_SERVICE_ACCOUNT_DIR, the standard path), so a
    # runtime that mounts volumes elsewhere (the tests' node agent) still finds it.
    folder = os.environ.get("KUBETUNE_SERVICE_ACCOUNT_DIR") or SERVICE_ACCOUNT_DIR
    try:
        InClusterConfigLoader(token_filename=f"{folder}/token",
                              cert_filename=f"{folder}/ca.crt").load_and_set()
    except config.ConfigException:
        config.load_kube_config()


def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials from the client config `load_kube_config` made (kopf's own client login
    re-reads the token from the standard path only, missing KUBETUNE_SERVICE_ACCOUNT_DIR)."""
    from kubernetes import client

    load_kube_config()  # again: kopf logs in anew when a token expires
    config = client.Configuration.get_default_copy()
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").partition(" ")
    if not token:
        scheme, token = None, scheme or None
    return kopf.ConnectionInfo(server=config.host, ca_path=config.ssl_ca_cert, insecure=not config.verify_ssl,
                               username=config.username or None, password=config.password or None,
                               scheme=scheme, token=token, certificate_path=config.cert_file,
                               private_key_path=config.key_file, trust_env=settings.networking.trust_env)


class UnkeptDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base, never written. It is the spec kopf last handled, for on.create and
    on.update handlers to diff against; this operator has none (a loop reconciles each run), so
    writing it would cost every new run one more PATCH, and the watch event that PATCH brings one
    more reconcile."""

    def store(self, **_: Any) -> None:
        pass

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        """kopf's essence, from the body less its status: kopf deep-copies the whole body for
        every watch event, only to drop the status, the largest part of a run's body."""
        if extra_fields:  # a handler on status fields would want them (this operator has none)
            return super().build(body=body, extra_fields=extra_fields)
        return super().build(body=kopf.Body({key: value for key, value in body.items() if key != "status"}))


def configure_kopf(settings: kopf.OperatorSettings, *, namespaced: bool = False, **_: Any) -> None:
    # Keep kopf's bookkeeping out of .status (which is ours and schema-checked) and sessions
    # short so an API-server restart is noticed within seconds.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.kubetune.dev")
    settings.persistence.diffbase_storage = UnkeptDiffBase(prefix="kopf.kubetune.dev")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.networking.request_timeout = 30
    # A run deleted by its own reconcile (ttlSecondsAfterFinished) finds its timer still running;
    # kopf would wait 60 s before looking again and only then release its finalizer.
    settings.background.instant_exit_timeout = 5
    settings.background.cancellation_polling = 1
    # Watching named namespaces, the operator holds no cluster-scoped rights (least privilege):
    # kopf would list Namespaces and watch CRDs anyway, and log each refusal. It serves the named
    # namespaces and the CRDs present at startup (the chart installs the CRD before the operator).
    settings.scanning.disabled = namespaced


def elect(options: RuntimeOptions, stop: threading.Event, health: Health):
    from kubernetes import client

    from ..leader import LeaseElector

    identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    elector = LeaseElector(client.CoordinationV1Api(), options.lease_namespace, options.lease_name, identity,
                           create=options.lease_create)
    if not elector.try_once():
        health.standby()  # the Lease was read: ready to take over
        if not elector.acquire(stop):
            return None
    threading.Thread(target=elector.keep_renewing, args=(stop,), daemon=True).start()
    return elector


# How long a thread may hold the GIL while another waits (Python's default: 5 ms). The event
# loop (kopf's watch of the runs, every run's wake-up) and the informer's watch threads each do a
# little work per event, then wait; under load 30-odd reconcile threads are busy in Python, and
# at 5 ms a turn each of those small steps queued behind them. At 200 runs created at once
# (bench/control_plane.py) 0.5 ms cut the operator's creation stage from 27.7 to 8.8 s p95 at
# the same CPU time.
GIL_SWITCH_INTERVAL = 0.0005


def client_with_pool(connections: int):
    """An API client with a connection per reconcile worker (the default pool is smaller)."""
    from kubernetes import client

    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = connections
    return client.ApiClient(configuration)


async def wait_synced(informer: ChildInformer, synced: asyncio.Event) -> None:
    while not informer.synced.is_set():  # polled: a thread blocked on it would hold up exit
        await asyncio.sleep(0.05)
    synced.set()


def run_operator(options: RuntimeOptions | None = None) -> int:
    limit_malloc_arenas()  # before any thread starts
    fix_mmap_threshold()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    logging.basicConfig(level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options or RuntimeOptions.from_env()
    settings = OperatorSettings.from_env()
    load_kube_config()
    health = Health()
    metrics.serve(options.metrics_port, options.metrics_addr, health)
    stop = threading.Event()
    elector = elect(options, stop, health) if options.leader_election else None
    if options.leader_election and elector is None:
        return 1
    health.leading()
    metrics.LEADER.set(1)
    kopf_stop = threading.Event()
    if elector is not None:  # leadership lost: stop acting at once, let the Deployment restart us
        threading.Thread(target=leave_when_lost, args=(elector, health, kopf_stop), daemon=True).start()
    kopf.on.startup()(functools.partial(configure_kopf, namespaced=bool(options.namespaces)))
    kopf.on.login(id="kubetune-login")(login)
    kopf.on.startup(id="kubetune-health")(lambda **_: health.started())
    handlers.register(settings, options.interval)
    pools = {"executor": options.workers, "side": options.workers, "resyncs": max(4, options.workers // 4)}
    events = EventPoster()
    api_client = client_with_pool(sum(pools.values()) + events.threads)
    wakeups = handlers.Wakeups()
    informer = ChildInformer(api_client, options.namespaces, wakeups.poke_from_thread)
    synced = asyncio.Event()

    @kopf.on.startup(id="kubetune-informer")
    async def start_informer(**_: Any) -> None:
        wakeups.loop = asyncio.get_running_loop()
        informer.start()
        wakeups.loop.create_task(wait_synced(informer, synced))

    memo = kopf.Memo(cluster=Cluster(informer.store, api_client, events), wakeups=wakeups, synced=synced,
                     progress=ProgressReader(settings.progress_interval_seconds),
                     **{name: concurrent.futures.ThreadPoolExecutor(threads, name)
                        for name, threads in pools.items()})
    log.info("kubetune operator: watching %s", ", ".join(options.namespaces) or "all namespaces")

    async def beat() -> None:  # /healthz fails when the event loop stops turning
        while True:
            health.beat()
            await asyncio.sleep(health.stale_s / 6)

    async def run_kopf() -> None:
        beating = asyncio.create_task(beat())
        try:
            await kopf.operator(
                standalone=True,  # leader election above replaces kopf's peering
                # kopf's default identity asks for the user's name, which a uid without a passwd
                # entry (the image's 65532, or whatever runAsUser a cluster picks) does not have.
                identity=socket.gethostname(),
                clusterwide=not options.namespaces,
                namespaces=list(options.namespaces),
                stop_flag=kopf_stop,
                memo=memo,
            )
        finally:
            informer.stop()
            beating.cancel()
            # kopf waits for a threading stop flag in an executor thread; when it stopped for
            # another reason (SIGTERM), that thread would block asyncio.run's exit forever.
            kopf_stop.set()

    asyncio.run(run_kopf())
    stop.set()
    if elector is not None and elector.lost.is_set():
        exit_now(EXIT_LOST_LEASE)
    if elector is not None:
        elector.release()  # a rolling update's next replica leads at once, not after the lease
    return 0


EXIT_LOST_LEASE = 1
LOST_LEASE_GRACE_S = 5.0


def leave_when_lost(elector, health: Health, kopf_stop: threading.Event) -> None:
    """Leadership lost: no graceful shutdown (as controller-runtime skips it then). kopf is
    asked to stop, and the process exits within a few seconds whatever its threads are doing:
    another replica may already act, and a reconcile still in flight is cut as a crash would be."""
    elector.lost.wait()
    health.lost()
    metrics.LEADER.set(0)
    kopf_stop.set()
    time.sleep(LOST_LEASE_GRACE_S)
    exit_now(EXIT_LOST_LEASE)


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown: threads blocked on the API server (a watch, a
    pool's request) would hold it up, or abort it, when they wake into a finalizing runtime."""
    log.error("leader election: lease lost, exiting (%d) for a restart", code)
    logging.shutdown()  # flushes the handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
