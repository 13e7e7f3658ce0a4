"""The operator's liveness and readiness: what the chart's probes ask, served on the metrics port."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from kubetune import metrics
from kubetune.health import Health


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_standby_that_read_the_lease_is_live_and_ready_to_take_over():
    health = Health()
    assert health.ready() == (False, "starting: waiting for the leader Lease")
    health.standby()
    assert health.live() == (True, "standby: waiting for the leader Lease")
    assert health.ready() == (True, "standby: waiting for the leader Lease")


def test_the_leader_is_ready_once_kopf_started():
    health = Health()
    health.leading()
    assert health.ready() == (False, "leading; kopf is starting")
    health.started()
    assert health.live() == (True, "leading") and health.ready() == (True, "leading")


def test_a_leader_whose_event_loop_stopped_is_not_live():
    clock = Clock()
    health = Health(stale_s=30, clock=clock)
    health.leading()
    health.started()
    clock.now += 20
    assert health.live()[0]
    health.beat()
    clock.now += 31
    assert health.live() == (False, "the event loop has not run for 31s")
    assert not health.ready()[0]


def test_a_replica_that_lost_the_lease_is_neither():
    health = Health()
    health.leading()
    health.started()
    health.lost()
    assert health.live() == (False, "lost the leader Lease; exiting")
    assert not health.ready()[0]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_probes_and_metrics_share_the_metrics_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    health = Health()
    metrics.serve(port, "127.0.0.1", health)
    assert get(port, "/readyz") == (503, "starting: waiting for the leader Lease\n")
    health.standby()
    assert get(port, "/healthz") == (200, "standby: waiting for the leader Lease\n")
    health.leading()
    health.started()
    assert get(port, "/readyz") == (200, "leading\n")
    status, text = get(port, "/metrics")
    assert status == 200 and "kubetune_reconcile_duration_seconds_count" in text


def test_a_renewal_never_remakes_a_deleted_lease():
    """`helm uninstall` deletes the chart's Lease: the leader must not bring it back."""
    from kubetune.leader import LeaseElector

    from .test_leader import MemoryLeases

    api = MemoryLeases()
    elector = LeaseElector(api, "ops", "kubetune", "first", duration_s=15)
    assert elector.try_acquire()
    api.lease = None  # deleted
    assert not elector.try_acquire(create=False) and api.lease is None
    assert elector.try_acquire() and api.lease.spec.holder_identity == "first"  # a fresh start may


def test_a_replica_waits_for_an_installer_made_lease_rather_than_make_one():
    from kubetune.leader import LeaseElector

    from .test_leader import MemoryLeases

    api = MemoryLeases()
    standby = LeaseElector(api, "ops", "kubetune", "second", create=False)
    assert not standby.try_acquire(create=standby.create) and api.lease is None
