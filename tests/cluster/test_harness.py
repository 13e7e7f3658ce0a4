"""Tests of the cluster harness itself: the real control plane and its nodes (the node agent, or
real kubelets) behave as the e2e tests need (Job controller, Pod Security, RBAC, pod env and
status, volumes, pod DNS, deletion, restarts)."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cluster

RESTRICTED = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


@pytest.fixture
def python(cluster):
    """Command, image and env of a container running Python: this interpreter on the node agent,
    the trainer image on real nodes. $KUBETUNE_TERMINATION_LOG names the termination message file."""
    if cluster.local:
        return [sys.executable], "kubetune/none:local", {}
    image = cluster.kubelets.images["trainer"] if cluster.kubelets else "python:3.11-slim"
    return ["python"], image, {"KUBETUNE_TERMINATION_LOG": "/dev/termination-log"}


def container(python, name: str, script: str, **extra) -> dict:
    command, image, env = python
    extra["env"] = [{"name": k, "value": v} for k, v in env.items()] + extra.get("env", [])
    return {"name": name, "image": image, "command": [*command, "-c", textwrap.dedent(script)],
            "securityContext": RESTRICTED, **extra}


def apply(kubectl, namespace: str, obj: dict, check: bool = True):
    return kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=check)


def pod(name: str, *containers: dict, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": list(containers), **spec}}


WRITE_ENV = """
    import json, os
    keys = ["POD_NAME", "POD_NAMESPACE", "POD_IP", "NODE", "JOB_COMPLETION_INDEX"]
    with open(os.environ["KUBETUNE_TERMINATION_LOG"], "w") as f:
        json.dump({k: os.environ.get(k) for k in keys}, f)
"""


def field_env(**paths: str) -> list[dict]:
    return [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in paths.items()]


def test_indexed_job_completes_with_fieldref_env_and_index(cluster, kubectl, namespace, python, wait_for):
    env = field_env(POD_NAME="metadata.name", POD_NAMESPACE="metadata.namespace",
                    POD_IP="status.podIP", NODE="spec.nodeName")
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "idx"},
           "spec": {"completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 0,
                    "template": {"spec": {"restartPolicy": "Never",
                                          "containers": [container(python, "main", WRITE_ENV, env=env)]}}}}
    apply(kubectl, namespace, job)

    def complete():
        conds = kubectl.json("get", "job", "idx", "-n", namespace).get("status", {}).get("conditions", [])
        assert not any(c["type"] == "Failed" and c["status"] == "True" for c in conds), conds
        return any(c["type"] == "Complete" and c["status"] == "True" for c in conds)
    wait_for(complete, 60, "job idx to complete")

    pods = kubectl.json("get", "pods", "-n", namespace, "-l", "job-name=idx")["items"]
    seen = {}
    for p in pods:
        assert p["status"]["phase"] == "Succeeded"
        term = p["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (term["exitCode"], term["reason"]) == (0, "Completed")
        out = json.loads(term["message"])
        assert out["POD_NAME"] == p["metadata"]["name"] and out["POD_NAMESPACE"] == namespace
        assert out["POD_IP"] == p["status"]["podIP"] and out["NODE"] == p["spec"]["nodeName"]
        seen[out["JOB_COMPLETION_INDEX"]] = out["POD_IP"]
    assert sorted(seen) == ["0", "1"]
    assert len(set(seen.values())) == 2, "each pod has its own IP"


def test_failing_container_reports_exit_code_and_message(kubectl, namespace, python, wait_for):
    script = """
        import os, sys
        open(os.environ["KUBETUNE_TERMINATION_LOG"], "w").write("bad input: no rows")
        sys.exit(3)
    """
    apply(kubectl, namespace, pod("fails", container(python, "main", script)))
    phase = lambda: kubectl.json("get", "pod", "fails", "-n", namespace)["status"].get("phase")  # noqa: E731
    wait_for(lambda: phase() == "Failed", 30, "pod fails to fail")
    term = kubectl.json("get", "pod", "fails", "-n", namespace)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"], term["message"]) == (3, "Error", "bad input: no rows")


def test_privileged_pod_is_refused_in_restricted_namespace(kubectl, namespace, python):
    bad = container(python, "main", "pass", securityContext={"privileged": True})
    proc = apply(kubectl, namespace, pod("priv", bad), check=False)
    assert proc.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in proc.stderr and "privileged" in proc.stderr


def test_rbac_denies_a_service_account_until_a_role_binds_it(kubectl, namespace, wait_for):
    kubectl("create", "serviceaccount", "sa", "-n", namespace)
    who = f"--as=system:serviceaccount:{namespace}:sa"
    can_i = lambda: kubectl("auth", "can-i", "list", "pods", "-n", namespace, who, check=False)  # noqa: E731
    denied = can_i()
    assert (denied.returncode, denied.stdout.strip()) == (1, "no")
    kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    kubectl("create", "rolebinding", "sa-reads", "--role=pod-reader", f"--serviceaccount={namespace}:sa",
            "-n", namespace)
    allowed = wait_for(lambda: (p := can_i()).returncode == 0 and p, 15, "the role to take effect")
    assert allowed.stdout.strip() == "yes"
    assert kubectl("auth", "can-i", "delete", "pods", "-n", namespace, who, check=False).stdout.strip() == "no"


def test_deleting_a_running_pod_kills_its_process(cluster, kubectl, namespace, python, wait_for):
    # The process ignores SIGTERM, so only the SIGKILL after the grace period ends it.
    script = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("up", flush=True)
        time.sleep(600)
    """
    apply(kubectl, namespace, pod("sleeper", container(python, "main", script), terminationGracePeriodSeconds=2))

    def running_container():
        status = kubectl.json("get", "pod", "sleeper", "-n", namespace)["status"]
        return status.get("phase") == "Running" and status["containerStatuses"][0]
    state = wait_for(running_container, 30, "pod sleeper to run")
    if cluster.local:
        wait_for(lambda: "up" in cluster.pod_logs(namespace, "sleeper"), 10, "the process to start")
        assert kubectl("logs", "sleeper", "-n", namespace).stdout == "up\n"
    kubectl("delete", "pod", "sleeper", "-n", namespace, "--wait=true", "--timeout=30s")
    if cluster.local:
        pid = int(state["containerID"].removeprefix("kubetune://"))
        wait_for(lambda: not pid_alive(pid), 5, f"process {pid} to die")


def test_volumes_and_pod_dns(cluster, kubectl, namespace, python, wait_for):
    """A ConfigMap volume and a PVC (under a subPath) reach the process, and a peer pod's cluster
    DNS name (as torchrun's MASTER_ADDR uses it) resolves to its IP."""
    kubectl("create", "configmap", "cfg", "--from-literal=config.json={\"lr\": 0.1}", "-n", namespace)
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    if cluster.kubelets:   # a local PersistentVolume for the claim, of the default class
        kubectl("apply", "-f", "-", input=json.dumps(cluster.kubelets.volume_for(namespace, "store")))
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                               "metadata": {"name": "store"}, "spec": claim})
    server = container(python, "main", "import time; time.sleep(600)")
    peer = pod("peer", server, hostname="rank-0", subdomain="ranks")
    peer["metadata"]["labels"] = {"app": "peer"}
    apply(kubectl, namespace, peer)
    # The headless Service that gives the peer its DNS name on a real cluster (CoreDNS serves it
    # once the peer is ready); the node agent rewrites the name to the peer's IP instead.
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ranks"},
                               "spec": {"clusterIP": "None", "selector": {"app": "peer"},
                                        "ports": [{"name": "rdzv", "port": 29500}]}})
    # The folder is the pod's to make: a kubelet's runtime would create a missing workingDir as
    # root, 0755, which the pod's user cannot write to.
    script = """
        import os, socket, sys, time
        cfg = open(sys.argv[1]).read()
        os.makedirs(os.environ["WORK"], exist_ok=True)
        open(os.path.join(os.environ["WORK"], "out.txt"), "w").write("written")
        for _ in range(100):   # the record appears once the peer is ready
            try:
                addr = socket.gethostbyname(os.environ["MASTER_ADDR"])
                break
            except OSError:
                time.sleep(0.3)
        open(os.environ["KUBETUNE_TERMINATION_LOG"], "w").write(cfg + " " + addr)
    """
    client = container(python, "main", script, args=["/etc/kubetune/config.json"],
                       env=[{"name": "MASTER_ADDR", "value": f"rank-0.ranks.{namespace}.svc"},
                            {"name": "WORK", "value": "/mnt/kubetune/run"}],
                       volumeMounts=[{"name": "cfg", "mountPath": "/etc/kubetune"},
                                     {"name": "store", "mountPath": "/mnt/kubetune", "subPath": "ns-a"}])
    client["workingDir"] = "/mnt/kubetune"
    # fsGroup, as the operator's pods set it, makes the claim's folder writable by the pod's user.
    apply(kubectl, namespace, pod("client", client, securityContext={"fsGroup": 1000}, volumes=[
        {"name": "cfg", "configMap": {"name": "cfg"}},
        {"name": "store", "persistentVolumeClaim": {"claimName": "store"}}]))
    get = lambda name: kubectl.json("get", "pod", name, "-n", namespace)["status"]  # noqa: E731
    wait_for(lambda: get("client").get("phase") in ("Succeeded", "Failed"), 60, "pod client to finish")
    status = get("client")
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert status["phase"] == "Succeeded", term
    assert term["message"] == '{"lr": 0.1} ' + get("peer")["podIP"]
    volume = (cluster.agent.root / "pvc" / namespace / "store" if cluster.local
              else cluster.kubelets.workdir / "volumes" / namespace / "store" if cluster.kubelets else None)
    if volume is not None:   # the claim's own folder on this machine, under the subPath
        assert (volume / "ns-a" / "run" / "out.txt").read_text() == "written"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_pods_finish_across_an_api_server_restart(cluster, kubectl, namespace, python, wait_for):
    if cluster.control_plane is None:
        pytest.skip("restarts the API server of this machine's cluster")
    apply(kubectl, namespace, pod("survivor", container(python, "main", "import time; time.sleep(3)")))
    wait_for(lambda: kubectl.json("get", "pod", "survivor", "-n", namespace)["status"].get("phase") == "Running",
             30, "pod survivor to run")
    cluster.control_plane.restart("kube-apiserver")
    wait_for(lambda: kubectl.json("get", "pod", "survivor", "-n", namespace)["status"].get("phase") == "Succeeded",
             60, "pod survivor to succeed after the restart")


def test_init_containers_run_first_and_on_failure_restarts(kubectl, namespace, python, wait_for):
    init = container(python, "init", """
        import os
        open("/kt-scratch/order", "a").write("init ")
    """)
    # Fails on its first run, succeeds once restarted: state lives in the shared emptyDir.
    main = container(python, "main", """
        import os, sys
        first = not os.path.exists("/kt-scratch/tried")
        open("/kt-scratch/tried", "w").close()
        open("/kt-scratch/order", "a").write("main ")
        open(os.environ["KUBETUNE_TERMINATION_LOG"], "w").write(open("/kt-scratch/order").read().strip())
        sys.exit(1 if first else 0)
    """)
    mount = [{"name": "work", "mountPath": "/kt-scratch"}]
    init["volumeMounts"] = main["volumeMounts"] = mount
    apply(kubectl, namespace, pod("retry", main, restartPolicy="OnFailure", initContainers=[init],
                                  volumes=[{"name": "work", "emptyDir": {}}]))
    get = lambda: kubectl.json("get", "pod", "retry", "-n", namespace)["status"]  # noqa: E731
    # Under OnFailure one restart means the first run failed. A kubelet shows that run as
    # lastState only during the restart's back-off, which a loaded machine can pass between two
    # polls (CI saw it), so the order the runs wrote and the restart count are what is checked.
    wait_for(lambda: get().get("phase") == "Succeeded", 90, "pod retry to succeed")
    main_status = get()["containerStatuses"][0]
    assert main_status["restartCount"] == 1
    assert main_status["state"]["terminated"]["message"] == "init main main"
