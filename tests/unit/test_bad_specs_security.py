"""What a hostile or careless spec cannot do: name a child badly, build a pod that is not
Pod Security `restricted`, leave its storage through `..`, wait forever on a missing Secret.

The names and pods come from the real builders (kubetune.manifests) for specs that Hypothesis
draws from everything the API accepts; the e2e twin is tests/e2e/test_bad_input.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune import api
from kubetune import manifests as m
from kubetune.reconcile import job_failure, job_state, pod_state
from kubetune.reconcile.decide import decide
from kubetune.reconcile.observe import Observed
from kubetune.resolve import resolve_config
from tests.unit.test_manifests import SETTINGS, restricted_violations

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

RUN_NAMES = st.from_regex(api.RUN_NAME_PATTERN, fullmatch=True).filter(lambda n: len(n) <= api.MAX_RUN_NAME_LENGTH)
NAMESPACES = st.from_regex(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", fullmatch=True)


def children(name: str, namespace: str, spec: dict[str, Any], attempt: int) -> list[dict[str, Any]]:
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": name, "namespace": namespace, "uid": "u"}, "spec": spec}
    run = api.parse_training_run(body)
    ctx = m.BuildContext(run, SETTINGS, resolve_config(run, SETTINGS), attempt)
    return [m.build_config_map(ctx), m.build_prep_job(ctx), m.build_service(ctx),
            m.build_train_job(ctx), m.build_finalize_job(ctx)]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=RUN_NAMES, namespace=NAMESPACES, nodes=st.integers(1, 1024), backoff=st.integers(0, 100),
       queue=st.none() | st.from_regex(r"^[a-z0-9]([-a-z0-9.]{0,40}[a-z0-9])?$", fullmatch=True),
       register=st.from_regex(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,20}\.[A-Za-z0-9_][A-Za-z0-9_-]{0,20}$", fullmatch=True))
def test_names_derived_from_any_accepted_input_are_valid_dns_names(name, namespace, nodes, backoff, queue, register):
    spec = {"model": "m", "trainDataPath": "/d/x.jsonl", "registerTo": register, "globalBatchSize": nodes,
            "resources": {"nodes": nodes}, "backoffLimit": backoff,
            "scheduling": {"queueName": queue} if queue else {}}
    attempt = backoff + 1  # the last attempt has the longest names
    built = children(name, namespace, spec, attempt)
    for child in built:
        meta = child["metadata"]
        assert DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 253, meta["name"]
        labels = {**meta.get("labels", {}), **child.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})}
        assert all(LABEL_VALUE.match(v) and len(v) <= 63 for v in labels.values()), labels
    assert DNS_LABEL.match(m.service_name(name)) and len(m.service_name(name)) <= 63
    hostname = m.rank_hostname(name, attempt, nodes - 1)  # an Indexed Job pod's hostname
    assert DNS_LABEL.match(hostname) and len(hostname) <= 63, hostname
    assert m.name_problem(name, attempt, nodes) is None
    for job in (c for c in built if c["kind"] == "Job"):
        assert restricted_violations(job["spec"]["template"]["spec"]) == []


@pytest.mark.parametrize("name", ["a" * 49, "a" * 300, "Run", "run.v2", "rün", "-run", "run-", "1run", "", "a_b"])
def test_odd_names_are_refused_before_any_child_is_named(name: str) -> None:
    with pytest.raises(api.SpecError) as caught:
        children(name, "ml", {"model": "m", "trainDataPath": "/d/x.jsonl", "registerTo": "c.s"}, 1)
    assert caught.value.field == "metadata.name"


@pytest.mark.parametrize("field,value", [
    ("trainDataPath", "../other/train.jsonl"), ("trainDataPath", "/mnt/kubetune/ml/../team-b/x.jsonl"),
    ("evalDataPath", "s3://bucket/ml/../team-b/eval.jsonl"), ("customWeightsPath", "/ckpt/../../etc/x.pt"),
    ("model", "/models/.."), ("trainDataPath", "data/..")])
def test_paths_cannot_climb_out_of_their_folder(field: str, value: str) -> None:
    spec = {"model": "m", "trainDataPath": "/d/x.jsonl", "registerTo": "c.s", field: value}
    with pytest.raises(api.SpecError) as caught:
        children("run", "ml", spec, 1)
    assert caught.value.field == f"spec.{field}" and "'..' segments" in caught.value.message


@pytest.mark.parametrize("value", ["/d/..data/x.jsonl", "/d/x..jsonl", "s3://b/v1..v2/", "org/ds..x/train"])
def test_dots_inside_a_name_are_fine(value: str) -> None:
    assert children("run", "ml", {"model": "m", "trainDataPath": value, "registerTo": "c.s"}, 1)


# --- A Secret that does not exist ----------------------------------------------------------------

def waiting_pod(message: str, reason: str = "CreateContainerConfigError") -> dict[str, Any]:
    return {"metadata": {"name": "run-prep-0", "namespace": "ml"},
            "status": {"phase": "Pending", "containerStatuses": [
                {"name": "prep", "state": {"waiting": {"reason": reason, "message": message}}}]}}


@pytest.mark.parametrize("message", ['secret "hf" not found', "couldn't find key token in Secret ml/hf"])
def test_a_missing_secret_fails_the_step_for_good_naming_it(message: str) -> None:
    pod = pod_state(waiting_pod(message))
    assert pod.failed and pod.permanent
    job = job_state({"metadata": {"name": "run-prep", "labels": {m.LABEL_COMPONENT: "prep"}},
                     "spec": {}, "status": {"active": 1}}, [pod])
    failure = job_failure(job, "DataPreparationFailed")
    assert (failure.reason, failure.permanent) == ("SecretNotFound", True)
    assert message in failure.message and "namespace ml" in failure.message


@pytest.mark.parametrize("pod", [waiting_pod("pulling image", "ContainerCreating"),
                                 waiting_pod('configmap "x" not found')])
def test_other_waits_are_not_failures(pod: dict[str, Any]) -> None:
    assert not pod_state(pod).failed


def test_the_run_fails_with_secret_not_found_and_its_job_is_stopped() -> None:
    from datetime import datetime, timezone

    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "run", "namespace": "ml", "uid": "u"},
            "spec": {"model": "m", "trainDataPath": "/d/x.jsonl", "registerTo": "c.s",
                     "secrets": {"hfToken": {"name": "hf", "key": "token"}}}, "status": {"phase": "PreparingData"}}
    prep = job_state({"metadata": {"name": "run-prep", "labels": {m.LABEL_COMPONENT: "prep"}}, "spec": {},
                      "status": {"active": 1}}, [pod_state(waiting_pod('secret "hf" not found'))])
    plan = decide(body, Observed(config_map=True, prep=prep), datetime.now(timezone.utc), SETTINGS)
    failed = next(c for c in plan.status["conditions"] if c["type"] == "Failed")
    assert plan.status["phase"] == "Failed" and failed["reason"] == "SecretNotFound"
    assert [ref.name for ref in plan.delete] == ["run-prep"]
