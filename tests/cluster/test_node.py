"""Tests of the real nodes (KUBETUNE_E2E_NODE=kubelet): registered kubelets on containerd, the pod
network across two nodes, Service DNS and ClusterIP, Pod Security enforced by the kubelet and
runc, local PersistentVolumes with fsGroup, the fake GPU resource."""

from __future__ import annotations

import json
import textwrap
import urllib.request

import pytest

from .images import REPO
from .node import base_runtime_spec

pytestmark = pytest.mark.cluster

RESTRICTED = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
              "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}}
TERMINATION_LOG = "/dev/termination-log"


@pytest.fixture(scope="module")
def kubelets(cluster):
    if not cluster.kubelets:
        pytest.skip("needs this machine's real nodes (the default; not KUBETUNE_E2E_NODE=agent)")
    return cluster.kubelets


def python_pod(kubelets, name: str, script: str, node: int | None = None, **spec) -> dict:
    container = {"name": "main", "image": kubelets.images["trainer"], "imagePullPolicy": "Never",
                 "command": ["python", "-c", textwrap.dedent(script)], "securityContext": RESTRICTED,
                 **spec.pop("container", {})}
    pod_spec = {"restartPolicy": "Never", "containers": [container], **spec}
    if node is not None:
        pod_spec["nodeName"] = kubelets.nodes.nodes[node].name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": pod_spec}


def apply(kubectl, namespace: str, *objects: dict) -> None:
    kubectl("apply", "-n", namespace, "-f", "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def finished(kubectl, namespace: str, name: str, wait_for, timeout: float = 90) -> dict:
    """The pod's terminated state once it ran to completion (an assertion if it failed)."""
    def done():
        status = kubectl.json("get", "pod", name, "-n", namespace).get("status", {})
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
    status = wait_for(done, timeout, f"pod {name} to finish", interval=0.5)
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert status["phase"] == "Succeeded", (term, kubectl("logs", name, "-n", namespace, check=False).stdout)
    return term


def test_nodes_are_ready_kubelets_on_containerd_with_a_gpu_resource(kubelets, kubectl):
    nodes = kubectl.json("get", "nodes")["items"]
    assert len(nodes) == len(kubelets.nodes.nodes) == 2
    for node in nodes:
        info, status = node["status"]["nodeInfo"], node["status"]
        assert info["containerRuntimeVersion"].startswith("containerd://"), info
        assert info["kubeletVersion"].startswith("v1.35."), info
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"])
        assert status["allocatable"]["nvidia.com/gpu"] == "8"
    dns = kubectl.json("get", "pods", "-n", "kube-system", "-l", "k8s-app=kube-dns")["items"]
    assert [p["status"]["phase"] for p in dns] == ["Running"]
    assert dns[0]["spec"]["containers"][0]["image"] == kubelets.images["coredns"]


PACKAGES = """
    import importlib.util, json, pathlib
    found = []
    for top in ("kubetune", "kubetune_trainer"):   # as installed, without importing them
        root = pathlib.Path(importlib.util.find_spec(top).origin).parent
        found += [".".join((top, *init.parent.relative_to(root).parts)) for init in root.rglob("*/__init__.py")]
    open("{log}", "w").write(json.dumps(sorted(found)))
"""


def test_the_trainer_image_holds_every_package_of_the_source(kubelets, kubectl, namespace, wait_for):
    apply(kubectl, namespace, python_pod(kubelets, "packages", PACKAGES.format(log=TERMINATION_LOG)))
    seen = json.loads(finished(kubectl, namespace, "packages", wait_for)["message"])
    roots = (REPO / "operator" / "kubetune", REPO / "trainer-image" / "kubetune_trainer")
    expected = sorted(".".join((root.name, *init.parent.relative_to(root).parts))
                      for root in roots for init in root.rglob("*/__init__.py"))
    assert seen == expected, "a subpackage is missing from the image's install"


SERVER = """
    import http.server, socket
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(socket.gethostname().encode())
    http.server.HTTPServer(("", 8080), Hello).serve_forever()
"""
CLIENT = """
    import json, socket, ssl, time, urllib.request
    name = "server.mesh.{ns}.svc.cluster.local"
    for _ in range(60):
        try:
            addr = socket.gethostbyname(name)
            break
        except OSError:
            time.sleep(1)
    body = urllib.request.urlopen(f"http://{{name}}:8080", timeout=10).read().decode()
    api = socket.create_connection(("kubernetes.default.svc", 443), timeout=10)
    api.close()
    open("{log}", "w").write(json.dumps({{"addr": addr, "body": body}}))
"""


def test_pods_on_two_nodes_meet_by_headless_dns_and_reach_services(kubelets, kubectl, namespace, wait_for):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mesh"},
               "spec": {"clusterIP": "None", "selector": {"app": "server"}, "ports": [{"port": 8080}]}}
    # Ready only once it listens: the headless name resolves from then on, and not before the
    # server binds (its Python start takes seconds), so the client's first GET finds it serving.
    listening = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    server = python_pod(kubelets, "server", SERVER, node=0, hostname="server", subdomain="mesh",
                        container={"readinessProbe": listening})
    client = python_pod(kubelets, "client", CLIENT.format(ns=namespace, log=TERMINATION_LOG), node=1)
    apply(kubectl, namespace, service, server, client)

    term = finished(kubectl, namespace, "client", wait_for)
    seen = json.loads(term["message"])
    pod_ip = kubectl.json("get", "pod", "server", "-n", namespace)["status"]["podIP"]
    assert seen == {"addr": pod_ip, "body": "server"}
    # This machine reaches pod IPs too (the operator scrapes rank 0's metrics so).
    assert urllib.request.urlopen(f"http://{pod_ip}:8080", timeout=10).read() == b"server"


PROBE = """
    import os
    out = {{"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())}}
    status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
    out.update(no_new_privs=status["NoNewPrivs"].strip(), seccomp=status["Seccomp"].strip(),
               cap_eff=status["CapEff"].strip())
    try:
        open("/etc/written", "w")
        out["root_fs"] = "writable"
    except OSError as e:
        out["root_fs"] = e.strerror
    path = "/data/probe.txt"
    open(path, "w").write("x")
    st = os.stat(path)
    out["file"] = [st.st_uid, st.st_gid]
    import json
    open("{log}", "w").write(json.dumps(out))
"""


def test_restricted_pod_runs_confined_on_a_local_volume_with_fsgroup(kubelets, kubectl, namespace, wait_for):
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
             "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "kubetune-local",
                      "resources": {"requests": {"storage": "1Gi"}}}}
    kubectl("apply", "-f", "-", input=json.dumps(kubelets.volume_for(namespace, "data")))
    pod = python_pod(kubelets, "probe", PROBE.format(log=TERMINATION_LOG),
                     securityContext={"fsGroup": 2000, "runAsNonRoot": True,
                                      "seccompProfile": {"type": "RuntimeDefault"}},
                     volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
                     container={"volumeMounts": [{"name": "data", "mountPath": "/data"}],
                                "resources": {"limits": {"nvidia.com/gpu": "1"}}})
    apply(kubectl, namespace, claim, pod)

    seen = json.loads(finished(kubectl, namespace, "probe", wait_for)["message"])
    assert seen["uid"] == 1000 and 2000 in seen["groups"]
    assert (seen["no_new_privs"], seen["seccomp"], seen["cap_eff"]) == ("1", "2", "0000000000000000")
    assert seen["root_fs"] == "Read-only file system"
    assert seen["file"] == [1000, 2000], "the kubelet gave the volume to the pod's fsGroup"


def test_a_pod_lives_through_kubelet_containerd_and_api_server_restarts(
        cluster, kubelets, kubectl, namespace, wait_for):
    script = "import time; time.sleep(40)"
    apply(kubectl, namespace, python_pod(kubelets, "survivor", script, node=0))
    running = lambda: kubectl.json("get", "pod", "survivor", "-n", namespace)["status"].get("phase") == "Running"  # noqa: E731
    wait_for(running, 60, "pod survivor to run")
    kubelets.nodes.restart_kubelet(0)
    kubelets.nodes.restart_containerd(0)
    cluster.control_plane.restart("kube-apiserver")
    finished(kubectl, namespace, "survivor", wait_for, timeout=90)
    status = kubectl.json("get", "pod", "survivor", "-n", namespace)["status"]["containerStatuses"][0]
    assert status["restartCount"] == 0, "the container itself never restarted"


def test_a_killed_main_process_restarts_its_container(kubelets, kubectl, namespace, wait_for):
    script = """
        import os, time
        if not os.path.exists("/work/tried"):
            open("/work/tried", "w").close()
            print("first run", flush=True)
            time.sleep(600)
        print("second run", flush=True)
        time.sleep(5)   # long enough to see the restarted container's status while it runs
    """
    pod = python_pod(kubelets, "crasher", script, restartPolicy="OnFailure",
                     volumes=[{"name": "work", "emptyDir": {}}],
                     container={"volumeMounts": [{"name": "work", "mountPath": "/work"}]})
    apply(kubectl, namespace, pod)
    get = lambda: kubectl.json("get", "pod", "crasher", "-n", namespace)["status"]  # noqa: E731
    wait_for(lambda: "first run" in kubectl("logs", "crasher", "-n", namespace, check=False).stdout, 60,
             "pod crasher's first run")
    wait_for(lambda: kubelets.nodes.kill_main_process(namespace, "crasher", "main"), 30,
             "the container's main process to be killed")
    # Read while the second run lives: once the pod is done, the kubelet may drop the dead one.
    status = wait_for(lambda: next((c for c in get()["containerStatuses"] if c["restartCount"]), None), 30,
                      "the container to restart", interval=0.3)
    assert status["lastState"]["terminated"]["exitCode"] == 137, status
    finished(kubectl, namespace, "crasher", wait_for)
    assert get()["containerStatuses"][0]["restartCount"] == 1


def test_the_base_container_spec_is_the_cri_default_plus_the_machines_passed_env():
    default = {"process": {"args": ["sh"], "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]},
               "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}, "namespaces": [{"type": "pid"}]}}
    spec = base_runtime_spec(default, {"OMP_NUM_THREADS": "1"})
    assert spec["process"] == {"args": ["sh"], "apparmorProfile": "", "env": ["OMP_NUM_THREADS=1"]}
    assert spec["linux"] == {"namespaces": [{"type": "pid"}]}
    assert "rlimits" in default["process"], "the default is left as it was"
    assert base_runtime_spec(default, {})["process"]["env"] == []
