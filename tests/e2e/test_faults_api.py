"""The API server answering 429 and 500 and cutting watch streams, between it and the operator.

A fault-injecting HTTPS proxy (`tests/support/faulty_proxy.py`) stands in front of the real
kube-apiserver; the operator connects through it with a kubeconfig that points there. Faults are
seeded and bounded (at most two failed requests in a row), and include writes the server applied
whose reply was lost, so a retried create or patch must not do anything twice. The run must
finish as it would without faults: one attempt, one Job per step, every status update there.
"""

from __future__ import annotations

import base64
import ssl
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from kubetune.k8s.cluster import camel
from tests.cluster import pki
from tests.support.faulty_proxy import Faults, FaultyProxy

from .conftest import OperatorProcess, free_port, log_size, operator_env, wait_leading
from .test_controls import ONE_SHOT_EVENTS, RUN_TIMEOUT, TERMINAL, children, condition, create, \
    event_types, names, tiny_spec

pytestmark = pytest.mark.cluster
FAULTS = Faults(seed=20261201, throttle=0.1, error=0.1, lost_reply=0.1, watch_cut=(2.0, 8.0), max_in_a_row=2)


def cluster_entry(kubeconfig: dict) -> dict:
    context = next(c for c in kubeconfig["contexts"]
                   if c["name"] == kubeconfig["current-context"])["context"]
    return next(c for c in kubeconfig["clusters"] if c["name"] == context["cluster"])["cluster"]


def upstream_tls(entry: dict) -> ssl.SSLContext:
    """How the proxy trusts the real API server: the kubeconfig's certificate authority."""
    if entry.get("certificate-authority-data"):
        return ssl.create_default_context(cadata=base64.b64decode(entry["certificate-authority-data"]).decode())
    if entry.get("certificate-authority"):
        return ssl.create_default_context(cafile=entry["certificate-authority"])
    if entry.get("insecure-skip-tls-verify"):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context
    return ssl.create_default_context()


@pytest.fixture
def faulty_api(cluster, operator_kubeconfig, tmp_path):
    """The proxy in front of the API server, and a copy of the operator's kubeconfig aimed at it."""
    if cluster.control_plane is None:
        pytest.skip("the proxy runs on this machine; a remote cluster's API server is left as it is")
    config = yaml.safe_load(Path(operator_kubeconfig).read_text())
    entry = cluster_entry(config)
    server = urlsplit(entry["server"])
    ca = pki.make_ca(tmp_path, "faulty-proxy-ca")
    leaf = pki.issue(ca, tmp_path, "proxy", "faulty-proxy", dns=("localhost",), ips=("127.0.0.1",))
    serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serving.load_cert_chain(leaf.cert, leaf.key)
    proxy = FaultyProxy(server.hostname, server.port or 443, faults=FAULTS, server_tls=serving,
                        upstream_tls=upstream_tls(entry)).start()
    entry.pop("certificate-authority", None)
    entry.pop("insecure-skip-tls-verify", None)
    entry.update({"server": proxy.url,
                  "certificate-authority-data": base64.b64encode(ca.cert.read_bytes()).decode()})
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    try:
        yield proxy, path
    finally:
        proxy.stop()


@pytest.fixture
def faulty_operator(operator, faulty_api, site, tmp_path, wait_for):
    """The session operator steps aside (a clean stop hands its Lease back) for one that talks to
    the API server through the proxy; afterwards the session operator leads again."""
    proxy, kubeconfig = faulty_api
    port = free_port()
    operator.stop()
    process = OperatorProcess(operator_env(kubeconfig, site, port), tmp_path / "faulty.log", port).start()
    try:
        wait_leading(process, 0, wait_for, timeout=180)
        yield process
    finally:
        process.stop()
        since = log_size(operator)
        operator.start()
        wait_leading(operator, since, wait_for, timeout=180)


@pytest.mark.slow  # one whole run behind the proxy
def test_an_operator_behind_a_throttling_failing_watch_cutting_api_server_converges_losing_nothing(
        faulty_operator, faulty_api, kubectl, namespace, inputs, wait_for):
    proxy, _ = faulty_api
    name = "weathered"
    create(kubectl, namespace, name, tiny_spec(inputs))
    restarts = 0

    def finished():
        nonlocal restarts
        if faulty_operator.process.poll() is not None:  # left for the Lease: restarted as a Deployment would
            assert faulty_operator.process.returncode == 1 and "lost lease" in faulty_operator.log_tail(), \
                faulty_operator.log_tail()
            restarts += 1
            since = log_size(faulty_operator)
            faulty_operator.start()
            wait_leading(faulty_operator, since, wait_for, timeout=180)
        run = kubectl.json("get", "trainingrun", name, "-n", namespace)
        return (run.get("status") or {}).get("phase") in TERMINAL and run
    run = wait_for(finished, RUN_TIMEOUT, f"{name} to finish behind the faulty API server", interval=1)

    status = run["status"]
    assert status["phase"] == "Succeeded", (status.get("conditions"), faulty_operator.log_tail())
    for step in ("DataPrepared", "Trained", "Registered", "Succeeded"):
        assert condition(run, step)["status"] == "True", status["conditions"]
    assert status["attempts"] == 1 and status["registeredModel"]["version"]
    assert status["dataStats"]["samples"] > 0 and status["progress"]["percent"] == 100.0
    assert status["mlflow"]["runId"] and status["startTime"] and status["completionTime"]
    counts = Counter(event_types(run))
    assert {t: counts[t] for t in ONE_SHOT_EVENTS} == dict.fromkeys(ONE_SHOT_EVENTS, 1), counts
    entries = [(e["type"], e["message"]) for e in status["events"]]
    assert len(entries) == len(set(entries)), entries
    assert names(children(kubectl, namespace, name, "jobs")) == {
        f"{name}-prep", f"{name}-train-1", f"{name}-finalize"}
    mirrors = Counter(e["reason"] for e in kubectl.json(
        "get", "events", "-n", namespace, f"--field-selector=involvedObject.name={name}")["items"])
    assert all(mirrors[camel(t)] <= 1 for t in ONE_SHOT_EVENTS), mirrors
    # The faults did happen: each kind at least once, so this test cannot pass on a quiet proxy.
    injected = {kind: proxy.counts[kind] for kind in ("throttle", "error", "lost_reply", "watch_cut")}
    assert all(injected.values()), (injected, proxy.counts)
    print(f"faults injected: {dict(proxy.counts)}; operator restarts for the Lease: {restarts}")
