"""The operator's Prometheus endpoint, and one leader among replicas.

Two operators with the same configuration stand for a Deployment with two replicas (processes of
this machine, or on real nodes the chart's pod and a second pod of its template): only the holder
of the Lease acts; when it dies, the other takes the Lease over once it expires and carries on.
The session operator is the first replica; it is restarted afterwards, so the tests after these
find it leading again.
"""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    LEASE_NAME,
    OPERATOR_NAMESPACE,
    apply,
    lease_holder,
    leader_identity,
    log_size,
    trainingrun,
    wait_leading,
    wait_phase,
)

from .site import Inputs

pytestmark = pytest.mark.cluster
RETRY_SECONDS = 2  # how often a waiting replica asks for the Lease (LeaseElector.retry_s)
SLACK_SECONDS = 5  # API calls and a busy machine


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text: str, sample_name: str, /, **labels: str) -> float | None:
    """The value of the sample whose labels include `labels`; None if there is none."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and labels.items() <= sample.labels.items():
                return sample.value
    return None


def create(kubectl, namespace: str, name: str, spec: dict) -> None:
    apply(kubectl, [{**trainingrun(name, spec), "metadata": {"name": name, "namespace": namespace}}])


def invalid_spec() -> dict:
    """A spec only the operator can judge (a catalog model's context window): Failed at once."""
    return {"model": "google/gemma-2-9b-it", "trainDataPath": "/nowhere/ift.jsonl",
            "registerTo": "main.e2e.operator", "contextLength": 16384}


def valid_spec(inputs: Inputs) -> dict:
    return {"model": inputs.model, "trainDataPath": inputs.data("ift.jsonl"), "registerTo": "main.e2e.operator",
            "contextLength": 128, "globalBatchSize": 8, "trainingDuration": "1ep"}


@pytest.fixture
def standby(operator, kubectl, tmp_path, wait_for):
    """A second replica: the session operator's command and env, its own metrics and log."""
    process = operator.standby(tmp_path).start()
    try:
        # Metrics are served before the election, so this says the process is up and waiting.
        wait_for(lambda: scrape(process.metrics_address), 120, "the second operator's metrics endpoint")
        yield process
    finally:
        if operator.alive():
            process.stop()
        else:  # the test killed the session operator: start it again and hand the Lease back
            since = log_size(operator)
            operator.start()
            process.stop()
            wait_leading(operator, since, wait_for, timeout=90)


def test_the_metrics_endpoint_serves_run_phases_and_reconcile_latency(operator, kubectl, namespace,
                                                                     wait_for):
    name = "metered"
    create(kubectl, namespace, name, invalid_spec())
    wait_phase(kubectl, namespace, name, {"Failed"}, 60, operator)

    def failed_recorded():
        text = scrape(operator.metrics_address)
        return metric(text, "kubetune_trainingrun_phase_info", namespace=namespace, name=name,
                      phase="Failed") == 1 and text
    text = wait_for(failed_recorded, 30, "the Failed phase in the operator's metrics")
    assert metric(text, "kubetune_trainingrun_phase_info", namespace=namespace, name=name,
                  phase="Training") == 0
    assert metric(text, "kubetune_trainingruns", namespace=namespace, phase="Failed") == 1
    assert metric(text, "kubetune_reconcile_duration_seconds_count") >= 1
    assert metric(text, "kubetune_reconcile_duration_seconds_bucket", le="+Inf") >= 1

    # A deleted run leaves the metrics: no stale series, no stale count.
    kubectl("delete", "trainingrun", name, "-n", namespace)

    def forgotten():
        text = scrape(operator.metrics_address)
        return (metric(text, "kubetune_trainingrun_phase_info", namespace=namespace, name=name) is None
                and not metric(text, "kubetune_trainingruns", namespace=namespace, phase="Failed"))
    wait_for(forgotten, 30, "the deleted run to leave the operator's metrics")


def test_a_second_operator_waits_for_the_lease_and_takes_over_when_the_leader_dies(
        operator, standby, kubectl, namespace, inputs, wait_for):
    leader = leader_identity(operator)
    assert leader and lease_holder(kubectl) == leader

    # While the leader lives, the second replica only waits: a new run is the leader's alone.
    create(kubectl, namespace, "first", invalid_spec())
    wait_phase(kubectl, namespace, "first", {"Failed"}, 60, operator)
    wait_for(lambda: metric(scrape(operator.metrics_address), "kubetune_trainingrun_phase_info",
                            namespace=namespace, name="first", phase="Failed") == 1,
             30, "the leader's metrics to show the run")
    waiting = scrape(standby.metrics_address)
    assert metric(waiting, "kubetune_trainingrun_phase_info") is None
    assert not metric(waiting, "kubetune_reconcile_duration_seconds_count")
    assert leader_identity(standby) is None and "watching" not in standby.log_tail()
    assert lease_holder(kubectl) == leader

    # The leader dies without a goodbye: the other takes the Lease over once it has expired...
    duration = kubectl.json("get", "lease", LEASE_NAME, "-n", OPERATOR_NAMESPACE)["spec"][
        "leaseDurationSeconds"]
    operator.kill()
    killed = time.monotonic()
    successor = wait_leading(standby, 0, wait_for, timeout=duration + 30)
    took = time.monotonic() - killed
    assert successor != leader and lease_holder(kubectl) == successor
    assert took <= duration + RETRY_SECONDS + SLACK_SECONDS, f"took {took:.1f}s, the lease is {duration}s"

    # ... and acts: it starts a new run's first step, and can stop it.
    create(kubectl, namespace, "second", valid_spec(inputs))
    wait_phase(kubectl, namespace, "second", {"PreparingData", "Training"}, 60, standby)
    jobs = kubectl.json("get", "jobs", "-n", namespace, "-l", "kubetune.dev/run=second")["items"]
    assert "second-prep" in {job["metadata"]["name"] for job in jobs}
    kubectl("annotate", "trainingrun", "second", "-n", namespace, "kubetune.dev/cancel=true")
    wait_phase(kubectl, namespace, "second", {"Cancelled"}, 60, standby)
    assert metric(scrape(standby.metrics_address), "kubetune_trainingrun_phase_info",
                  namespace=namespace, name="second", phase="Cancelled") == 1
