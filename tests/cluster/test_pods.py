"""Unit tests of the node agent's pure helpers (no cluster needed)."""

import base64

import pytest

from tests.cluster.pods import (
    ContainerConfigError,
    ContainerState,
    exit_code_of,
    expand,
    pod_phase,
    resolve_env,
    rewrite_dns,
    rewrite_paths,
    schedulable,
    termination_message,
)

POD = {"metadata": {"name": "p-0", "namespace": "ns", "uid": "u1",
                    "labels": {"app": "x"}, "annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
       "spec": {"nodeName": "kt-node-0", "containers": []},
       "status": {"podIP": "127.9.0.2"}}
OBJECTS = {
    ("ConfigMap", "ns", "cm"): {"kind": "ConfigMap", "data": {"A": "from-cm", "B": "b"}},
    ("Secret", "ns", "s"): {"kind": "Secret", "data": {"TOKEN": base64.b64encode(b"t0k").decode()}},
}


def lookup(kind, ns, name):
    return OBJECTS.get((kind, ns, name))


def test_env_sources_in_kubelet_order():
    container = {
        "envFrom": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "s"}, "prefix": "S_"}],
        "env": [
            {"name": "A", "value": "override"},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IDX", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "TOKEN"}}},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "none", "key": "k", "optional": True}}},
            {"name": "REF", "value": "$(NAME)-$(IDX) $$(NAME) $(UNSET)"},
        ]}
    env = resolve_env(container, POD, lookup, {"HOSTNAME": "p-0"})
    assert env["A"] == "override" and env["B"] == "b" and env["S_TOKEN"] == "t0k"
    assert (env["NAME"], env["IDX"], env["IP"], env["APP"], env["KEY"]) == ("p-0", "1", "127.9.0.2", "x", "t0k")
    assert "OPT" not in env
    assert env["REF"] == "p-0-1 $(NAME) $(UNSET)"


def test_missing_required_reference_is_a_config_error():
    container = {"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}]}
    with pytest.raises(ContainerConfigError, match="not found"):
        resolve_env(container, POD, lookup)


def test_rewrite_paths_at_boundaries_longest_first_once():
    mounts = {"/mnt/kubetune": "/tmp/r/pvc", "/mnt/kubetune/data": "/tmp/r/data", "/tmp": "/tmp/r/tmp"}
    assert rewrite_paths("--work=/mnt/kubetune/runs/a", mounts) == "--work=/tmp/r/pvc/runs/a"
    assert rewrite_paths("/mnt/kubetune/data/x", mounts) == "/tmp/r/data/x"
    assert rewrite_paths("/mnt/kubetuneX /opt/mnt/kubetune", mounts) == "/mnt/kubetuneX /opt/mnt/kubetune"
    assert rewrite_paths("file:///mnt/kubetune", mounts) == "file:///tmp/r/pvc"
    assert rewrite_paths("/tmp/x", mounts) == "/tmp/r/tmp/x"   # replaced once, not again


def test_rewrite_dns_names_of_pods():
    ips = {("run-train-0", "run-train", "ns"): "127.5.0.2"}
    text, missing = rewrite_dns("tcp://run-train-0.run-train.ns.svc:29500 run-train-1.run-train.ns.svc.cluster.local",
                                lambda *k: ips.get(k))
    assert text == "tcp://127.5.0.2:29500 run-train-1.run-train.ns.svc.cluster.local"
    assert missing == ["run-train-1.run-train.ns.svc.cluster.local"]


def test_expand_leaves_unknown_and_escapes():
    assert expand("$(A)$$(A)$(B)", {"A": "1"}) == "1$(A)$(B)"


def test_node_selector_and_gates():
    labels = {"kubernetes.io/hostname": "kt-node-0"}
    assert schedulable({"spec": {}}, labels)
    assert schedulable({"spec": {"nodeSelector": {"kubernetes.io/hostname": "kt-node-0"}}}, labels)
    assert not schedulable({"spec": {"nodeSelector": {"gpu": "a100"}}}, labels)
    assert not schedulable({"spec": {"schedulingGates": [{"name": "kueue"}]}}, labels)


def _state(state, code=None):
    c = ContainerState("c", state=state)
    c.exit_code = code
    return c


@pytest.mark.parametrize("init,app,policy,phase", [
    ([], [_state("waiting")], "Never", "Pending"),
    ([_state("running")], [_state("waiting")], "Never", "Pending"),
    ([_state("terminated", 1)], [_state("waiting")], "Never", "Failed"),
    ([], [_state("running"), _state("terminated", 1)], "Never", "Running"),
    ([], [_state("terminated", 0), _state("terminated", 1)], "Never", "Failed"),
    ([], [_state("terminated", 0)], "Never", "Succeeded"),
    ([], [_state("terminated", 0)], "OnFailure", "Succeeded"),
    ([], [_state("terminated", 2)], "OnFailure", "Running"),
    ([], [_state("terminated", 0)], "Always", "Running"),
])
def test_pod_phase(init, app, policy, phase):
    assert pod_phase(init, app, policy) == phase


def test_termination_message_and_exit_codes():
    assert termination_message(b"x" * 5000, b"", 0, "File") == "x" * 4096
    assert termination_message(b"", b"boom\n", 1, "FallbackToLogsOnError") == "boom\n"
    assert termination_message(b"", b"boom\n", 1, "File") == ""
    assert exit_code_of(-15) == 143 and exit_code_of(3) == 3
