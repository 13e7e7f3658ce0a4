"""The Lease rule: one holder at a time, takeover only after expiry."""

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from kubetune.leader import LeaseState, decide_lease, expired, lease_body

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_first_candidate_takes_a_missing_lease():
    assert decide_lease(None, "a", T0, 15) == LeaseState("a", T0, 15, 0)


def test_holder_renews_without_a_transition():
    held = LeaseState("a", T0, 15, 3)
    assert decide_lease(held, "a", at(5), 15) == LeaseState("a", at(5), 15, 3)


def test_other_candidate_waits_while_the_lease_is_live():
    assert decide_lease(LeaseState("a", T0, 15, 0), "b", at(14.9), 15) is None


def test_other_candidate_takes_an_expired_lease_and_counts_the_transition():
    assert decide_lease(LeaseState("a", T0, 15, 2), "b", at(15), 15) == LeaseState("b", at(15), 15, 3)


def test_released_lease_is_free():
    assert expired(LeaseState(None, None, 15), T0)


def test_lease_body_carries_the_resource_version_for_optimistic_locking():
    body = lease_body("kubetune", LeaseState("a", T0, 15, 1), "42")
    assert body["metadata"] == {"name": "kubetune", "resourceVersion": "42"}
    assert body["spec"]["holderIdentity"] == "a"
    assert body["spec"]["renewTime"] == "2026-01-01T00:00:00.000000Z"


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 5)), min_size=1, max_size=40))
def test_never_two_live_holders(attempts):
    """Whatever order candidates try in, a live lease only ever changes hands after expiry."""
    lease, now = None, T0
    for candidate, wait in attempts:
        now += dt.timedelta(seconds=wait)
        wanted = decide_lease(lease, candidate, now, 10)
        if wanted is not None and lease is not None and wanted.holder != lease.holder:
            assert expired(lease, now)
        lease = wanted or lease


class MemoryLeases:
    """The Lease API's semantics that the elector relies on: 404, 409, resourceVersion checks."""

    def __init__(self):
        self.lease, self.version = None, 0

    def _stored(self, body):
        from kubernetes.client import V1Lease, V1LeaseSpec, V1ObjectMeta

        spec = body["spec"]
        renewed = dt.datetime.strptime(spec["renewTime"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
        self.version += 1
        self.lease = V1Lease(metadata=V1ObjectMeta(name=body["metadata"]["name"], resource_version=str(self.version)),
                             spec=V1LeaseSpec(holder_identity=spec["holderIdentity"], renew_time=renewed,
                                              lease_duration_seconds=spec["leaseDurationSeconds"],
                                              lease_transitions=spec["leaseTransitions"]))

    def read_namespaced_lease(self, name, namespace):
        from kubernetes.client.exceptions import ApiException

        if self.lease is None:
            raise ApiException(status=404)
        return self.lease

    def create_namespaced_lease(self, namespace, body):
        from kubernetes.client.exceptions import ApiException

        if self.lease is not None:
            raise ApiException(status=409)
        self._stored(body)

    def replace_namespaced_lease(self, name, namespace, body):
        from kubernetes.client.exceptions import ApiException

        if body["metadata"].get("resourceVersion") != self.lease.metadata.resource_version:
            raise ApiException(status=409)
        self._stored(body)


def test_elector_holds_refuses_a_rival_and_releases_on_shutdown():
    from kubetune.leader import LeaseElector

    api = MemoryLeases()
    first = LeaseElector(api, "ops", "kubetune", "first", duration_s=15)
    second = LeaseElector(api, "ops", "kubetune", "second", duration_s=15)
    assert first.try_acquire() and not second.try_acquire()
    assert first.try_acquire()  # renewal
    second.release()  # not the holder: changes nothing
    assert api.lease.spec.holder_identity == "first"
    first.release()
    assert api.lease.spec.holder_identity is None
    assert second.try_acquire() and api.lease.spec.holder_identity == "second"
    assert api.lease.spec.lease_transitions == 1


LOSES_ITS_LEASE = r"""
import threading, types
from kubetune.health import Health
from kubetune.k8s import main

main.LOST_LEASE_GRACE_S = 0.2
stuck = threading.Thread(target=threading.Event().wait)   # a request that never returns
stuck.start()
elector = types.SimpleNamespace(lost=threading.Event())
kopf_stop = threading.Event()
elector.lost.set()
main.leave_when_lost(elector, Health(), kopf_stop)
"""


def test_a_replica_that_lost_its_lease_exits_1_even_with_a_thread_stuck_on_a_request():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LOSES_ITS_LEASE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "lease lost, exiting (1)" in proc.stderr
