"""The Helm chart installed for real: `helm install`, a TrainingRun to Succeeded under the operator
that runs as the chart's pod, `helm upgrade` rolling the operator under a running run, `helm
uninstall` leaving only the CRD and the runs. A real Prometheus (Debian's) discovers the operator
and rank-0 trainer pods through the API server, as the chart's ServiceMonitor/PodMonitor select
them, loads the chart's alert rules, and every query of every Grafana panel returns data. The
Argo CD health script judges the live run.

One test on purpose: installing, running, upgrading and uninstalling share one ~2-minute run.
The session's own operator is stopped meanwhile (two operators must not both act).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml

from .conftest import free_port, log_size, trainingrun, wait_leading, wait_phase
from .site import REPO, Inputs, chart_values

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CHART = REPO / "charts" / "kubetune"
RELEASE = "kt"
FULLNAME = "kt-kubetune"
LEASE = "kubetune-operator"
DASHBOARD = REPO / "grafana" / "kubetune-dashboard.json"
RULES = REPO / "prometheus" / "kubetune-rules.yaml"
HEALTH_LUA = REPO / "argocd" / "resource_customizations" / "kubetune.dev" / "TrainingRun" / "health.lua"
RUN_TIMEOUT = 420


def release_values(site, namespace: str, metrics_port: int, image: str | None) -> dict:
    """The site's chart values (its defaults point the runs where the pods see things), for one
    namespace, serving metrics on the pod's own address."""
    return {**chart_values(site, image), "watchNamespaces": [namespace],
            "metrics": {"port": metrics_port, "bindAddress": "$(POD_IP)"}}


def operator_image(cluster) -> str | None:
    """The operator image: built here for real nodes, named by the user for a real cluster, none
    for the node agent (it runs this checkout's `kubetune`)."""
    if cluster.kubelets:
        return cluster.kubelets.images["operator"]
    return os.environ.get("KUBETUNE_E2E_OPERATOR_IMAGE")


class Helm:
    def __init__(self, binary: Path, kubeconfig: Path, namespace: str):
        self.binary, self.kubeconfig, self.namespace = binary, kubeconfig, namespace

    def __call__(self, *args: str, timeout: float = 240) -> str:
        argv = [str(self.binary), f"--kubeconfig={self.kubeconfig}", "-n", self.namespace, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout


# --- Prometheus -------------------------------------------------------------------------------

# Debian's prometheus is built without Kubernetes service discovery, so the test discovers the
# pods itself, with the selection of the chart's ServiceMonitor (operator) and PodMonitor (trainer
# rank 0), and hands them to Prometheus as file_sd targets refreshed every second.

def operator_targets(pod: dict) -> dict | None:
    labels = pod["metadata"].get("labels", {})
    ready = any(c["type"] == "Ready" and c["status"] == "True"
                for c in pod.get("status", {}).get("conditions", []))
    if labels.get("app.kubernetes.io/instance") != RELEASE or not ready:
        return None
    return {"pod": pod["metadata"]["name"]}


def trainer_targets(pod: dict) -> dict | None:
    labels = pod["metadata"].get("labels", {})
    if (labels.get("kubetune.dev/component"), labels.get("batch.kubernetes.io/job-completion-index")) != ("train", "0"):
        return None
    return {"namespace": pod["metadata"]["namespace"], "pod": pod["metadata"]["name"],
            "trainingrun": labels.get("kubetune.dev/run", "")}


def metrics_endpoints(pod: dict) -> list[str]:
    ip = pod.get("status", {}).get("podIP")
    return [f"{ip}:{port['containerPort']}" for c in pod["spec"]["containers"]
            for port in c.get("ports", []) if port.get("name") == "metrics"] if ip else []


class PodDiscovery:
    """Writes `<job>.json` file_sd targets for the pods each job selects, once a second."""

    def __init__(self, kubectl, workdir: Path, jobs: dict[str, tuple[str, Callable[[dict], dict | None]]]):
        self.kubectl, self.workdir, self.jobs = kubectl, workdir, jobs
        self.stopped = threading.Event()
        self.refresh()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def file(self, job: str) -> Path:
        return self.workdir / f"{job}.json"

    def refresh(self) -> None:
        for job, (namespace, select) in self.jobs.items():
            listed = self.kubectl("get", "pods", "-n", namespace, "-o", "json", check=False)
            if listed.returncode != 0:
                continue
            groups = [{"targets": endpoints, "labels": labels}
                      for pod in json.loads(listed.stdout)["items"]
                      if (labels := select(pod)) is not None and (endpoints := metrics_endpoints(pod))]
            tmp = self.file(job).with_suffix(".tmp")
            tmp.write_text(json.dumps(groups))
            tmp.replace(self.file(job))

    def loop(self) -> None:
        while not self.stopped.wait(1.0):
            self.refresh()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)


def prometheus_config(discovery: PodDiscovery) -> dict:
    def job(name: str, **extra) -> dict:
        return {"job_name": name, **extra,
                "file_sd_configs": [{"files": [str(discovery.file(name))], "refresh_interval": "1s"}]}
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [job("kubetune-operator", honor_labels=True), job("kubetune-trainer")],
    }


class Prometheus:
    def __init__(self, workdir: Path, config: dict):
        self.port = free_port()
        self.workdir = workdir
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        binary = subprocess.run(["bash", str(REPO / "tools" / "prometheus.sh"), "prometheus"],
                                capture_output=True, text=True)
        assert binary.returncode == 0, binary.stderr
        self.log = open(workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [binary.stdout.strip(), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step="1s")["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$namespace", ".*"))
            for panel in dashboard["panels"] for target in panel["targets"]]


def finite(result: list[dict]) -> bool:
    return any(not math.isnan(float(value)) for series in result for _, value in series["values"])


# --- helpers ----------------------------------------------------------------------------------

def operator_pods(kubectl, namespace: str) -> list[dict]:
    return kubectl.json("get", "pods", "-n", namespace, "-l",
                        f"app.kubernetes.io/instance={RELEASE}")["items"]


def running(pods: list[dict]) -> list[dict]:
    return [p for p in pods if p["status"].get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp") and p["status"].get("podIP")]


def probe(pod: dict, port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:{port}{path}", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:  # not listening (yet)
        return 0


def leaders(pods: list[dict], port: int) -> list[str]:
    """The pods whose operator says it holds the Lease (`kubetune_operator_leader 1.0`)."""
    def leads(pod: dict) -> bool:
        url = f"http://{pod['status']['podIP']}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return "kubetune_operator_leader 1.0" in response.read().decode()
        except OSError:
            return False
    return [p["metadata"]["name"] for p in pods if leads(p)]


def health(live: dict, tmp_path: Path, luahealth: Path) -> dict:
    path = tmp_path / f"live-{live['status'].get('phase')}.yaml"
    path.write_text(yaml.safe_dump(live))
    out = subprocess.run([str(luahealth), "-eval", str(HEALTH_LUA), str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


NOT_STATE = {"events", "events.events.k8s.io"}  # a record of what happened, not what is installed


def inventory(kubectl) -> set[str]:
    """Every object of every listable kind, namespaced and cluster-scoped, as `kind/ns/name`;
    a TrainingRun's children (labelled with their run) belong to the runs, not to the release."""
    kinds = [k for k in kubectl("api-resources", "--verbs=list", "-o", "name").stdout.split()
             if k not in NOT_STATE]
    items = kubectl.json("get", ",".join(kinds), "--all-namespaces")["items"]
    return {f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}" for o in items
            if "kubetune.dev/run" not in (o["metadata"].get("labels") or {})}


def leftovers(kubectl, preexisting: set[str], runs_ns: str) -> list[str]:
    """What exists now and did not before the install, less what is kept on purpose: the CRD
    and the TrainingRuns."""
    kept = {"CustomResourceDefinition//trainingruns.kubetune.dev"}
    return sorted(k for k in inventory(kubectl) - preexisting - kept
                  if not k.startswith(f"TrainingRun/{runs_ns}/"))


def can(kubectl, user: str, namespace: str, verb: str) -> bool:
    out = kubectl("auth", "can-i", verb, "trainingruns.kubetune.dev", "-n", namespace, f"--as={user}",
                  check=False).stdout.strip()
    return out == "yes"


@pytest.fixture
def quiet_session_operator(operator, wait_for):
    """The session's operator process handles every namespace: stop it while the chart's runs."""
    operator.stop()
    try:
        yield
    finally:
        since = log_size(operator)
        operator.start()
        wait_leading(operator, since, wait_for, timeout=120)


@pytest.fixture
def luahealth():
    if shutil.which("go") is None:
        pytest.skip("the Argo CD health runner is built with Go")
    proc = subprocess.run(["bash", str(REPO / "tools" / "go-tool.sh"), "luahealth"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def test_helm_install_run_upgrade_uninstall_with_prometheus_and_argocd_health(
        quiet_session_operator, cluster, kubectl, helm, namespace, inputs: Inputs, site,
        wait_for, tmp_path, luahealth):
    image = operator_image(cluster)
    if not cluster.local and not image:
        pytest.skip("on a real cluster the chart needs KUBETUNE_E2E_OPERATOR_IMAGE (operator/Dockerfile)")
    operator_ns = f"{namespace}-op"
    kubectl("create", "namespace", operator_ns)
    kubectl("label", "namespace", operator_ns, "pod-security.kubernetes.io/enforce=restricted")
    metrics_port = free_port()
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(release_values(site, namespace, metrics_port, image)))
    run_helm = Helm(helm, cluster.kubeconfig, operator_ns)
    crd_was_there = kubectl("get", "crd", "trainingruns.kubetune.dev", check=False).returncode == 0
    discovery = PodDiscovery(kubectl, tmp_path, {"kubetune-operator": (operator_ns, operator_targets),
                                                   "kubetune-trainer": (namespace, trainer_targets)})
    prometheus = Prometheus(tmp_path, prometheus_config(discovery))
    started = time.time()
    # The namespace's own account and CA bundle come from controllers: wait, so they count as before.
    wait_for(lambda: kubectl("get", "serviceaccount/default", "configmap/kube-root-ca.crt", "-n", operator_ns,
                             check=False).returncode == 0, 60, "the operator namespace's defaults")
    preexisting = inventory(kubectl)
    try:
        # --- install: the operator runs as the chart's pod, under Pod Security `restricted` -----
        if cluster.control_plane:  # this machine's, built with release version stamps
            assert kubectl.json("version")["serverVersion"]["gitVersion"] == "v1.35.4"
        # The chart's kubeVersion is checked against the server here (it refuses v0.0.0).
        notes = run_helm("install", RELEASE, str(CHART), "-f", str(values), "--wait", "--timeout", "180s")
        assert f"rollout status deploy/{FULLNAME}" in notes
        crd = kubectl.json("get", "crd", "trainingruns.kubetune.dev")
        if not crd_was_there:  # installed from the chart's crds/, with what Argo CD needs
            assert crd["metadata"]["annotations"]["argocd.argoproj.io/sync-options"] == "ServerSideApply=true"
        else:  # the session's CRD came first: the chart's copy must still be what the API takes
            kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts",
                    "-f", str(CHART / "crds" / "trainingruns.kubetune.dev.yaml"))
        first = wait_for(lambda: running(operator_pods(kubectl, operator_ns)), 60, "the operator pod")
        assert wait_for(lambda: leaders(first, metrics_port), 60, "the operator to lead") == \
            [first[0]["metadata"]["name"]]
        assert probe(first[0], metrics_port, "/healthz") == 200
        wait_for(lambda: probe(first[0], metrics_port, "/readyz") == 200, 60, "the leader's kopf to start")
        assert kubectl.json("get", "lease", LEASE, "-n", operator_ns)["spec"]["holderIdentity"]

        # --- people: `edit` in a namespace creates runs there, `view` only reads them ------------
        kubectl("create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice", "-n", namespace)
        kubectl("create", "rolebinding", "bob-view", "--clusterrole=view", "--user=bob", "-n", namespace)
        wait_for(lambda: can(kubectl, "alice", namespace, "create") and can(kubectl, "bob", namespace, "list"),
                 60, "the aggregated roles to reach edit and view")
        probe_run = yaml.safe_dump(trainingrun("rbac-probe", {"model": inputs.model, "trainDataPath": inputs.data(
            "ift.jsonl"), "registerTo": "main.e2e.helm"}))
        kubectl("create", "--dry-run=server", "--as=alice", "-n", namespace, "-f", "-", input=probe_run)
        refused = kubectl("create", "--dry-run=server", "--as=bob", "-n", namespace, "-f", "-",
                          input=probe_run, check=False)
        assert refused.returncode != 0 and "forbidden" in refused.stderr, refused.stderr

        # --- a short run to Succeeded, then a long one to upgrade the operator under --------------
        spec = {"model": inputs.model, "trainDataPath": inputs.data("ift.jsonl"),
                "registerTo": "main.e2e.helm", "trainingDuration": "1ep", "learningRate": 1e-3,
                "contextLength": 128, "globalBatchSize": 8}
        kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(trainingrun("short-run", spec)))
        done = wait_phase(kubectl, namespace, "short-run", {"Succeeded", "Failed"}, RUN_TIMEOUT)
        status = done["status"]
        assert status["phase"] == "Succeeded", status
        verdict = health(done, tmp_path, luahealth)
        assert verdict == {"status": "Healthy",
                           "message": f"Registered main.e2e.helm version {status['registeredModel']['version']}"}
        long_spec = {**spec, "trainDataPath": inputs.data("ift-long.jsonl"), "trainingDuration": "20ep"}
        kubectl("apply", "-n", namespace, "-f", "-",
                input=yaml.safe_dump(trainingrun("helm-run", long_spec)))
        wait_for(lambda: (kubectl.json("get", "trainingrun", "helm-run", "-n", namespace)["status"]
                          .get("progress") or {}).get("percent"), RUN_TIMEOUT, "helm-run to report progress")
        training = kubectl.json("get", "trainingrun", "helm-run", "-n", namespace)
        assert training["status"]["phase"] == "Training", training["status"]
        train_job = kubectl.json("get", "jobs", "-n", namespace, "-l",
                                 "kubetune.dev/component=train,kubetune.dev/run=helm-run")["items"]
        assert len(train_job) == 1
        pod_spec = train_job[0]["spec"]["template"]["spec"]
        assert pod_spec["serviceAccountName"] == "kubetune-trainer"
        assert pod_spec["automountServiceAccountToken"] is False
        assert health(training, tmp_path, luahealth)["status"] == "Progressing"

        # --- upgrade: new settings roll the operator (Recreate); the run goes on ----------------
        run_helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "replicaCount=2",
                 "--set", "logLevel=DEBUG", "--wait", "--timeout", "180s")
        old_names = {p["metadata"]["name"] for p in first}

        def rolled():
            pods = running(operator_pods(kubectl, operator_ns))
            fresh = [p for p in pods if p["metadata"]["name"] not in old_names]
            return fresh if len(fresh) == 2 and len(pods) == 2 else None
        second = wait_for(rolled, 120, "two new operator pods")
        assert len(wait_for(lambda: leaders(second, metrics_port), 60, "one new replica to lead")) == 1
        # The standby is live and Ready (it read the Lease), so `rollout status` finishes.
        wait_for(lambda: all(probe(p, metrics_port, path) == 200 for p in second for path in ("/healthz", "/readyz")),
                 60, "both replicas to be live and Ready")
        # The new leader keeps reporting the same attempt's progress: the roll restarted nothing.
        before = training["status"]["progress"]["percent"]
        moved = wait_for(lambda: (lambda st: st.get("phase") == "Training" and st["progress"]["percent"] > before
                                  and st)(kubectl.json("get", "trainingrun", "helm-run", "-n", namespace)["status"]),
                         RUN_TIMEOUT, "helm-run's progress to move under the new operator")
        assert moved["attempts"] == 1
        jobs = kubectl.json("get", "jobs", "-n", namespace, "-l",
                            "kubetune.dev/component=train,kubetune.dev/run=helm-run")["items"]
        assert [j["metadata"]["uid"] for j in jobs] == [train_job[0]["metadata"]["uid"]]
        kubectl("annotate", "trainingrun", "helm-run", "-n", namespace, "kubetune.dev/cancel=true")
        wait_phase(kubectl, namespace, "helm-run", {"Cancelled"}, RUN_TIMEOUT)

        # --- Prometheus: the rules load, and every panel's query returns data -------------------
        rules = prometheus.api("rules")["groups"]
        assert [r["health"] for g in rules for r in g["rules"]] == ["ok"] * 4, rules
        end = time.time()
        empty, nan_only = [], []
        for title, expr in panel_queries():
            result = prometheus.query_range(expr, started, end)
            if not result:
                empty.append(f"{title}: {expr}")
            elif not finite(result) and "MFU" not in title:  # MFU is NaN where the GPU peak is unknown
                nan_only.append(f"{title}: {expr}")
        assert empty == [] and nan_only == [], (
            f"panels without data: {empty}; NaN only: {nan_only}; targets: "
            f"{prometheus.api('targets')['activeTargets']}")
    finally:
        prometheus.stop()
        discovery.stop()
        logs = "\n".join(cluster.pod_logs(operator_ns, p["metadata"]["name"])[-3000:]
                         for p in operator_pods(kubectl, operator_ns)) if cluster.control_plane else ""
        print(f"--- operator pods' logs:\n{logs}")  # shown when the test fails

    # --- uninstall: the CRD and the runs stay, nothing else -------------------------------------
    run_helm("uninstall", RELEASE, "--wait", "--timeout", "120s")
    wait_for(lambda: not operator_pods(kubectl, operator_ns), 60, "the operator pods to go")
    assert kubectl.json("get", "crd", "trainingruns.kubetune.dev")["metadata"]["name"]
    kept = kubectl.json("get", "trainingrun", "short-run", "-n", namespace)
    assert kept["status"]["phase"] == "Succeeded"
    # Alice is still bound to `edit`, which no longer grants TrainingRuns: the user roles went too.
    wait_for(lambda: not can(kubectl, "alice", namespace, "create"), 60, "edit to lose the TrainingRun rights")
    kubectl("delete", "rolebinding", "alice-edit", "bob-view", "-n", namespace)
    deadline = time.monotonic() + 30  # the garbage collector takes the ReplicaSets and pods
    while leftovers(kubectl, preexisting, namespace) and time.monotonic() < deadline:
        time.sleep(1)
    assert leftovers(kubectl, preexisting, namespace) == []
    kubectl("delete", "namespace", operator_ns, "--wait=false")
