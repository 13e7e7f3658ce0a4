"""Leader election on a coordination.k8s.io Lease, so two operator replicas never both act.

kopf's own peering pauses every replica when two share a priority, which a Deployment with
`replicas: 2` always does; the Lease protocol of client-go's leaderelection has one winner.
`decide_lease` is the pure rule; `LeaseElector` is the thin I/O loop around it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass

from .timestamps import micro_timestamp

log = logging.getLogger("kubetune.leader")


@dataclass(frozen=True)
class LeaseState:
    holder: str | None
    renewed: dt.datetime | None
    duration_s: int
    transitions: int = 0


def expired(lease: LeaseState, now: dt.datetime) -> bool:
    if lease.holder is None or lease.renewed is None:
        return True
    return now >= lease.renewed + dt.timedelta(seconds=lease.duration_s)


def decide_lease(lease: LeaseState | None, me: str, now: dt.datetime, duration_s: int) -> LeaseState | None:
    """The lease to write to hold leadership now, or None when another live holder has it."""
    if lease is None:
        return LeaseState(me, now, duration_s, 0)
    if lease.holder == me:
        return LeaseState(me, now, duration_s, lease.transitions)
    if expired(lease, now):
        return LeaseState(me, now, duration_s, lease.transitions + 1)
    return None


def lease_body(name: str, state: LeaseState, resource_version: str | None = None) -> dict:
    metadata = {"name": name}
    if resource_version:
        metadata["resourceVersion"] = resource_version  # optimistic lock: lose races cleanly
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": state.holder,
            "leaseDurationSeconds": state.duration_s,
            "renewTime": micro_timestamp(state.renewed),
            "leaseTransitions": state.transitions,
        },
    }


def state_of(lease) -> LeaseState:
    spec = lease.spec
    return LeaseState(spec.holder_identity, spec.renew_time, spec.lease_duration_seconds or 15,
                      spec.lease_transitions or 0)


class LeaseElector:
    """Acquire, then keep renewing; `lost` is set the moment leadership cannot be confirmed."""

    def __init__(self, coordination_api, namespace: str, name: str, identity: str,
                 duration_s: int = 15, retry_s: float = 2.0, create: bool = True):
        self.api, self.namespace, self.name, self.me = coordination_api, namespace, name, identity
        self.duration_s, self.retry_s = duration_s, retry_s
        # False when the Lease is the installer's (the Helm chart's): a standby must not re-make it
        # while `helm uninstall` takes everything away.
        self.create = create
        self.lost = threading.Event()

    def try_acquire(self, create: bool = True) -> bool:
        """Hold the lease now; `create=False` (renewing) never makes one that was deleted."""
        from kubernetes.client.exceptions import ApiException

        now = dt.datetime.now(dt.timezone.utc)
        try:
            current = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            current = None
        if current is None and not create:
            return False  # deleted under us (an uninstall, an admin): leadership is not certain
        wanted = decide_lease(current and state_of(current), self.me, now, self.duration_s)
        if wanted is None:
            return False
        try:
            if current is None:
                self.api.create_namespaced_lease(self.namespace, lease_body(self.name, wanted))
            else:
                body = lease_body(self.name, wanted, current.metadata.resource_version)
                self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as error:
            if error.status in (409, 422):  # someone else wrote first
                return False
            raise
        return True

    def try_once(self) -> bool:
        """One try at the Lease, announced when won; a failing API server counts as a loss."""
        try:
            won = self.try_acquire(create=self.create)
        except Exception as error:  # a throttled or failing API server: ask again, do not crash
            log.warning("leader election: %s", str(error).strip().splitlines()[0])
            return False
        if won:
            self.announce()
        return won

    def acquire(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self.try_once():
                return True
            stop.wait(self.retry_s)
        return False

    def announce(self) -> None:
        log.info("leader election: %s holds lease %s/%s", self.me, self.namespace, self.name)

    def release(self) -> None:
        """On a clean shutdown: hand the lease back so a successor need not wait it out."""
        from kubernetes.client.exceptions import ApiException

        try:
            current = self.api.read_namespaced_lease(self.name, self.namespace)
            if current.spec.holder_identity != self.me:
                return
            now = dt.datetime.now(dt.timezone.utc)
            released = LeaseState(None, now, 1, current.spec.lease_transitions or 0)
            body = lease_body(self.name, released, current.metadata.resource_version)
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as error:  # best effort: the lease still expires on its own
            log.warning("leader election: could not release the lease: %s", error.reason)

    def keep_renewing(self, stop: threading.Event) -> None:
        """Renew every third of the lease, and soon again after a failed try (a throttled or
        failing API server); give up (set `lost`) before another replica may take it."""
        deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.duration_s)
        renewed = True
        while not stop.wait(self.duration_s / 3 if renewed else min(self.retry_s, self.duration_s / 3)):
            try:
                renewed = self.try_acquire(create=False)
            except Exception as error:  # an unreachable API server is not leadership
                log.warning("leader election: renew failed: %s", error)
                renewed = False
            now = dt.datetime.now(dt.timezone.utc)
            if renewed:
                deadline = now + dt.timedelta(seconds=self.duration_s)
            elif now >= deadline - dt.timedelta(seconds=self.duration_s / 3):
                log.error("leader election: lost lease %s/%s", self.namespace, self.name)
                self.lost.set()
                return
