"""The parts of the kopf shell that need no API server: the watch-fed store, freshness, progress
reads, naming, options, how a tick's writes go out."""

import asyncio
import concurrent.futures
import copy
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import kopf
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune import metrics
from kubetune.api import EventType
from kubetune.k8s.cluster import Cluster, EventPoster, camel
from kubetune.k8s.handlers import Wakeups, sleep_until_woken
from kubetune.k8s.informer import ChildStore
from kubetune.k8s.main import RuntimeOptions, UnkeptDiffBase
from kubetune.reconcile import ChildRef, Plan, PlannedEvent, observe
from kubetune.tick import ProgressReader, apply, scrape

METRICS = """\
# HELP kubetune_train_progress_ratio progress
kubetune_train_progress_ratio 0.25
kubetune_train_batches_done 5.0
kubetune_train_batches_total 20.0
kubetune_train_loss 2.5
kubetune_train_info{latest_checkpoint="/mnt/ckpt/ep1-ba5-rank0.pt",mlflow_experiment_id="1",mlflow_run_id="abc"} 1.0
"""


def serve(body: str):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_event_reasons_are_camel_case():
    assert camel("TRAIN_STARTED") == "TrainStarted" and camel("COMPLETED") == "Completed"


def test_scrape_reads_rank0_progress():
    server = serve(METRICS)
    try:
        progress = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
    assert progress["percent"] == 25 and progress["batchesDone"] == 5 and progress["loss"] == 2.5
    assert progress["latestCheckpoint"] == "/mnt/ckpt/ep1-ba5-rank0.pt"
    assert progress["mlflow"] == {"experimentId": "1", "runId": "abc"}


def test_an_unreachable_trainer_is_no_news_not_an_error():
    assert scrape("http://127.0.0.1:9/metrics", timeout=0.5) is None
    assert scrape(None) is None


def test_progress_is_read_at_most_once_per_interval_and_the_last_report_stands():
    reads = []
    reader = ProgressReader(interval=3600, read=lambda url: reads.append(url) or {"percent": len(reads)})
    assert reader.progress("u1", "http://a/metrics") == {"percent": 1}
    assert reader.progress("u1", "http://a/metrics") == {"percent": 1}  # a child's change: no read
    assert reader.progress("u2", "http://b/metrics") == {"percent": 2}  # another run reads its own
    assert reads == ["http://a/metrics", "http://b/metrics"]
    assert reader.progress("u1", None) is None  # rank 0 gone: nothing to read, nothing kept
    assert reader.progress("u1", "http://a/metrics") == {"percent": 3}


def test_a_failed_read_keeps_the_last_report():
    answers = iter([{"percent": 10.0}, None])
    reader = ProgressReader(interval=0, read=lambda url: next(answers))
    assert reader.progress("u", "http://a") == {"percent": 10.0}
    assert reader.progress("u", "http://a") == {"percent": 10.0}


def test_runtime_options_from_env():
    options = RuntimeOptions.from_env({"KUBETUNE_WATCH_NAMESPACES": "a,b", "KUBETUNE_RECONCILE_INTERVAL": "2",
                                       "KUBETUNE_LEADER_ELECTION": "false", "POD_NAMESPACE": "ops"})
    assert options.namespaces == ("a", "b") and options.interval == 2.0
    assert not options.leader_election and options.lease_namespace == "ops"
    assert RuntimeOptions.from_env({}).namespaces == ()


def child(name: str, run: str | None = "r", namespace: str = "ns", rv: str = "1") -> dict:
    labels = {"kubetune.dev/run": run} if run else {}
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels, "resourceVersion": rv,
                         "managedFields": [{"manager": "kube-controller-manager"}]}}


def test_the_store_keeps_each_runs_children_by_kind():
    store = ChildStore()
    assert store.put("jobs", child("r-prep")) == ("ns", "r")
    assert store.put("pods", child("r-prep-x")) == ("ns", "r")
    assert store.put("pods", child("other-x", run="other")) == ("ns", "other")
    assert store.put("pods", child("unlabelled", run=None)) is None
    found = store.children("ns", "r")
    assert [j["metadata"]["name"] for j in found["jobs"]] == ["r-prep"]
    assert [p["metadata"]["name"] for p in found["pods"]] == ["r-prep-x"]
    assert found["config_maps"] == [] and found["services"] == []
    assert "managedFields" not in found["jobs"][0]["metadata"]  # never read: not kept
    assert store.children("elsewhere", "r")["pods"] == []

    store.put("pods", child("r-prep-x", rv="2"))  # a change replaces the copy
    assert store.children("ns", "r")["pods"][0]["metadata"]["resourceVersion"] == "2"
    assert store.remove("pods", child("r-prep-x")) == ("ns", "r")
    assert store.children("ns", "r")["pods"] == []


def test_a_change_of_what_the_reconcile_never_reads_is_no_news():
    store = ChildStore()
    pod = {**child("r-train-1-0"), "spec": {"nodeName": ""}, "status": {"phase": "Pending"}}
    assert store.put("pods", copy.deepcopy(pod)) == ("ns", "r")
    bound = {**copy.deepcopy(pod), "spec": {"nodeName": "n"}}
    bound["metadata"].update(resourceVersion="2", finalizers=["batch.kubernetes.io/job-tracking"])
    bound["status"].update(startTime="2026-12-01T00:00:00Z", hostIP="10.0.0.1", conditions=[{"type": "PodScheduled"}])
    assert store.put("pods", bound) is None  # bound, tracked, scheduled: nothing observe reads
    assert store.children("ns", "r")["pods"][0]["metadata"]["resourceVersion"] == "2"  # still the newest copy
    running = copy.deepcopy(bound)
    running["metadata"]["resourceVersion"], running["status"]["phase"] = "3", "Running"
    assert store.put("pods", running) == ("ns", "r")
    job = {**child("r-train-1"), "status": {"active": 1}}
    assert store.put("jobs", copy.deepcopy(job)) == ("ns", "r")
    assert store.put("jobs", {**copy.deepcopy(job), "status": {"active": 1, "ready": 1}}) is None
    assert store.put("jobs", {**copy.deepcopy(job), "status": {"active": 0, "succeeded": 1}}) == ("ns", "r")


def test_a_fresh_list_replaces_the_copy_and_names_the_runs_that_changed():
    store = ChildStore()
    for name, run in (("a-prep", "a"), ("b-prep", "b"), ("c-prep", "c")):
        store.put("jobs", child(name, run=run))
    store.put("jobs", child("d-prep", run="d", namespace="other"))
    # b's Job was deleted while the watch was down, c's changed, a's did not; another namespace
    # is not this list's business.
    changed = store.replace("jobs", "ns", [child("a-prep", run="a"), child("c-prep", run="c", rv="5")])
    assert changed == {("ns", "b"), ("ns", "c")}
    assert store.children("ns", "b")["jobs"] == []
    assert store.children("other", "d")["jobs"] != []


class Answering:
    """Stands in for the REST client: records each request and answers `answer`, as the API
    server answers a status patch with the object it wrote."""

    def __init__(self, answer: dict | None = None):
        self.answer, self.sent = answer or {}, []

    def json(self, method, path, **options):
        self.sent.append((method, path, options))
        return self.answer

    def send(self, method, path, **options):
        self.sent.append((method, path, options))
        return b"{}"


def run_at(rv: str, phase: str) -> dict:
    return {"metadata": {"name": "r", "namespace": "ns", "uid": "u", "resourceVersion": rv},
            "status": {"phase": phase}}


def test_the_run_decided_on_is_never_older_than_our_own_last_write():
    cluster = Cluster(ChildStore(), client.ApiClient(client.Configuration()))  # never connects
    cluster.rest = Answering(run_at("12", "Training"))
    cluster.patch_status("ns", "r", {"phase": "Training"})
    assert cluster.rest.sent == [("PATCH", "/apis/kubetune.dev/v1alpha1/namespaces/ns/trainingruns/r/status",
                                  {"body": {"status": {"phase": "Training"}},
                                   "content_type": "application/merge-patch+json"})]
    stale = run_at("11", "PreparingData")  # the watch has not delivered our write yet
    assert cluster.newest(stale)["status"]["phase"] == "Training"
    caught_up = run_at("12", "Training")
    assert cluster.newest(caught_up) is caught_up
    edited = run_at("14", "Training")  # a user's edit after it: the watch's copy wins
    assert cluster.newest(edited) is edited
    assert cluster.newest(stale) is stale  # our write is forgotten once the watch passed it


def test_only_the_echo_of_our_own_last_status_patch_is_no_news_and_it_ends_our_copy():
    cluster = Cluster(ChildStore(), client.ApiClient(client.Configuration()))  # never connects
    cluster.rest = Answering({**run_at("12", "Training"), "metadata": {
        **run_at("12", "Training")["metadata"], "managedFields": [{"manager": "kubetune"}]}})
    assert not cluster.watched(run_at("11", "PreparingData"))
    cluster.patch_status("ns", "r", {"phase": "Training"})
    stale = run_at("11", "PreparingData")
    assert "managedFields" not in cluster.newest(stale)["metadata"]  # our copy: what is read of it
    assert not cluster.watched(stale) and cluster.newest(stale) is not stale
    assert cluster.watched(run_at("12", "Training"))  # the echo: the watch caught up
    assert cluster.newest(stale) is stale  # our copy is gone with it
    assert cluster.watched(run_at("12", "Training"))  # delivered again (a relist): still ours
    assert not cluster.watched(run_at("13", "Training"))  # kopf's finalizer, a user's edit
    assert not cluster.watched({**run_at("12", "Training"), "metadata": {"uid": "other", "resourceVersion": "12"}})
    cluster.forget("u")
    assert not cluster.watched(run_at("12", "Training"))


def test_a_poke_is_timed_from_the_first_change_until_its_reconcile_takes_it():
    wakeups = Wakeups()
    event = wakeups.event("ns", "r")
    wakeups.poke("ns", "other")  # a run with no loop: nothing kept
    assert wakeups.take("ns", "other") is None
    before = time.monotonic()
    wakeups.poke("ns", "r")
    wakeups.poke("ns", "r")  # a second change before the reconcile: the first one's time stands
    first = wakeups.take("ns", "r")
    assert event.is_set() and first is not None and before <= first <= time.monotonic()
    assert wakeups.take("ns", "r") is None  # taken: a timer's tick has no wait to report
    wakeups.poke("ns", "r")
    wakeups.forget("ns", "r")
    assert wakeups.take("ns", "r") is None


def test_the_store_keeps_only_what_observe_reads_and_observes_the_same():
    labels = {"kubetune.dev/run": "r", "kubetune.dev/component": "train", "kubetune.dev/attempt": "2",
              "batch.kubernetes.io/job-name": "r-train-2"}
    container = {"name": "trainer", "image": "kubetune-trainer", "command": ["sh"], "env": [{"name": "A", "value": "1"}]}
    job = {"metadata": {"name": "r-train-2", "namespace": "ns", "labels": labels, "resourceVersion": "7"},
           "spec": {"suspend": False, "completions": 2, "parallelism": 2,
                    "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}},
           "status": {"active": 1, "succeeded": 1, "ready": 1, "terminating": 0, "startTime": "2026-12-01T00:00:00Z",
                      "uncountedTerminatedPods": {}, "conditions": [{"type": "SuccessCriteriaMet", "status": "False"}]}}
    owner = [{"apiVersion": "batch/v1", "kind": "Job", "name": "r-train-2", "uid": "j", "controller": True}]
    pod = {"metadata": {"name": "r-train-2-0-x", "namespace": "ns", "labels": labels, "resourceVersion": "8",
                        "annotations": {"batch.kubernetes.io/job-completion-index": "0"}, "ownerReferences": owner,
                        "finalizers": ["batch.kubernetes.io/job-tracking"]},
           "spec": {"containers": [container], "nodeName": "n"},
           "status": {"phase": "Succeeded", "podIP": "10.0.0.2", "hostIP": "10.0.0.1", "qosClass": "BestEffort",
                      "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                      "containerStatuses": [
               {"name": "trainer", "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                                              "message": '{"ok": true, "step": "train"}'}},
                "image": "kubetune-trainer", "imageID": "sha256:0", "containerID": "containerd://1", "ready": False,
                "started": False, "restartCount": 1, "lastState": {"terminated": {"exitCode": 137}},
                "volumeMounts": [{"name": "work", "mountPath": "/work"}], "user": {"linux": {"uid": 1000}}}]}}
    service = {"metadata": {"name": "r-train", "namespace": "ns", "labels": labels, "resourceVersion": "9"},
               "spec": {"clusterIP": "None", "ports": [{"port": 29500}]}, "status": {"loadBalancer": {}}}
    full = observe(jobs=[copy.deepcopy(job)], pods=[copy.deepcopy(pod)], services=[copy.deepcopy(service)])
    store = ChildStore()
    for kind, obj in (("jobs", job), ("pods", pod), ("services", service)):
        store.put(kind, obj)
    kept = store.children("ns", "r")
    assert "spec" not in kept["pods"][0] and "template" not in kept["jobs"][0]["spec"]
    assert "conditions" not in kept["pods"][0]["status"] and "ownerReferences" not in kept["pods"][0]["metadata"]
    assert set(kept["pods"][0]["status"]) == {"phase", "podIP", "containerStatuses"}
    assert [set(c) for c in kept["pods"][0]["status"]["containerStatuses"]] == [{"name", "state"}]
    assert set(kept["jobs"][0]["status"]) == {"active", "succeeded", "conditions"}
    assert kept["jobs"][0]["spec"] == {"suspend": False, "completions": 2}
    assert "finalizers" not in kept["pods"][0]["metadata"]
    assert set(kept["services"][0]) == {"metadata"}
    assert kept["jobs"][0]["spec"]["completions"] == 2
    assert observe(jobs=kept["jobs"], pods=kept["pods"], services=kept["services"]) == full


class Writes:
    """A cluster whose writes take their time, recording what ran on which thread."""

    def __init__(self, create_error: Exception | None = None):
        self.patch_started, self.log, self.create_error = threading.Event(), [], create_error

    def create(self, manifest):
        self.log.append(("create waits for the patch", self.patch_started.wait(5)))
        if self.create_error:
            raise self.create_error

    def delete(self, ref):
        self.log.append(("delete", ref))

    def patch_status(self, namespace, name, status):
        self.patch_started.set()
        time.sleep(0.05)
        self.log.append(("patched", threading.current_thread().name))

    def post_event(self, run, event, now):
        self.log.append(("event", event.type))


def a_plan(**changes) -> Plan:
    event = PlannedEvent(EventType.DATA_VALIDATED, "prepared", "2026-01-01T00:00:00Z")
    return replace(Plan(status={"phase": "Training"}, create=({"kind": "Job"},), events=(event,)), **changes)


def test_the_status_patch_goes_out_beside_the_childrens_writes_and_lands_before_the_events():
    cluster, side = Writes(), concurrent.futures.ThreadPoolExecutor(1, "side")
    apply(cluster, run_at("1", "PreparingData"), a_plan(), datetime.now(timezone.utc), side)
    # The create saw the patch under way (one after the other, it would wait its 5 s out).
    assert cluster.log == [("create waits for the patch", True), ("patched", "side_0"),
                           ("event", EventType.DATA_VALIDATED)]
    plain = Writes()  # no side threads (local mode): one after the other, the children first
    plain.patch_started.set()
    apply(plain, run_at("1", "PreparingData"), a_plan(), datetime.now(timezone.utc))
    assert [entry[0] for entry in plain.log] == ["create waits for the patch", "patched", "event"]


def test_a_failed_create_fails_the_tick_after_its_patch_is_done_and_posts_no_event():
    cluster = Writes(create_error=RuntimeError("API down"))
    side = concurrent.futures.ThreadPoolExecutor(1, "side")
    with pytest.raises(RuntimeError, match="API down"):
        apply(cluster, run_at("1", "PreparingData"), a_plan(), datetime.now(timezone.utc), side)
    assert cluster.log[-1] == ("patched", "side_0")  # never left in flight


class Creates:
    """A cluster whose creates each take 0.2 s, recording when each began and ended."""

    def __init__(self, fail: str | None = None):
        self.spans, self.fail, self.lock = {}, fail, threading.Lock()

    def create(self, manifest):
        began = time.monotonic()
        time.sleep(0.2)
        with self.lock:
            self.spans[manifest["kind"]] = (began, time.monotonic())
        if manifest["kind"] == self.fail:
            raise RuntimeError(f"{self.fail} refused")

    def patch_status(self, namespace, name, status):
        pass


def test_a_plans_children_go_out_together_after_its_config_map():
    cluster, side = Creates(), concurrent.futures.ThreadPoolExecutor(4, "side")
    plan = a_plan(create=({"kind": "ConfigMap"}, {"kind": "Service"}, {"kind": "Job"}), events=())
    apply(cluster, run_at("1", "Pending"), plan, datetime.now(timezone.utc), side)
    spans = cluster.spans
    assert spans["ConfigMap"][1] <= min(spans["Service"][0], spans["Job"][0])  # the pods mount it
    assert abs(spans["Service"][0] - spans["Job"][0]) < 0.1  # at once: one round trip, not two
    failing = Creates(fail="Service")  # an error is raised once every create has ended
    with pytest.raises(RuntimeError, match="Service refused"):
        apply(failing, run_at("1", "Pending"), plan, datetime.now(timezone.utc), side)
    assert set(failing.spans) == {"ConfigMap", "Service", "Job"}


def test_events_are_posted_off_the_tick_and_a_full_backlog_drops_them_counted():
    release, posted = threading.Event(), []
    poster = EventPoster(threads=1, backlog=2)
    dropped = metrics.REGISTRY.get_sample_value("kubetune_events_dropped_total") or 0.0
    assert poster.submit(lambda: (release.wait(5), posted.append(1)))  # taken by the thread
    time.sleep(0.05)
    assert poster.submit(lambda: posted.append(2)) and poster.submit(lambda: posted.append(3))
    assert not poster.submit(lambda: posted.append(4))  # the backlog is full
    assert metrics.REGISTRY.get_sample_value("kubetune_events_dropped_total") == dropped + 1
    assert posted == []  # the caller never waited for a post
    release.set()
    poster.join()
    assert posted == [1, 2, 3]


def test_only_mirrored_events_go_out_as_kubernetes_events():
    queued = []

    class Recording(EventPoster):
        def submit(self, post):
            queued.append(post)
            return True

    cluster = Cluster(ChildStore(), client.ApiClient(client.Configuration()), Recording(threads=0))
    now = datetime.now(timezone.utc)
    for type_ in (EventType.CREATED, EventType.VALIDATED, EventType.REGISTERED, EventType.COMPLETED):
        cluster.post_event(run_at("1", "Pending"), PlannedEvent(type_, "m", "t"), now)
    assert len(queued) == 2  # Created and Completed; their siblings say nothing more
    cluster.rest = Answering()
    queued[0]()
    [(method, path, options)] = cluster.rest.sent
    assert (method, path) == ("POST", "/api/v1/namespaces/ns/events")
    sent = options["body"]
    assert sent["involvedObject"] == {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun", "name": "r",
                                      "namespace": "ns", "uid": "u", "resourceVersion": "1"}
    assert sent["reason"] == "Created" and sent["metadata"] == {"generateName": "r.", "namespace": "ns"}
    assert sent["firstTimestamp"] == sent["lastTimestamp"] == now.strftime("%Y-%m-%dT%H:%M:%SZ")
    held = [cell.cell_contents for cell in queued[0].__closure__ if isinstance(cell.cell_contents, dict)]
    assert held and all("status" not in d for d in held)  # a queued Event holds no copy of the run's body
    assert not PlannedEvent(EventType.VALIDATED, "m", "t").mirrored
    assert PlannedEvent(EventType.FAILED, "m", "t").mirrored


def test_a_loop_knows_whether_a_change_or_its_timer_woke_it():
    async def both():
        wake = asyncio.Event()
        timed_out = await sleep_until_woken(wake, 0.01)
        asyncio.get_running_loop().call_later(0.01, wake.set)
        return timed_out, await sleep_until_woken(wake, 5)

    assert asyncio.run(both()) == (False, True)


def test_kopf_keeps_no_diff_base_on_the_runs():
    storage = UnkeptDiffBase(prefix="kopf.kubetune.dev")
    body = kopf.Body({"metadata": {"name": "r"}, "spec": {"model": "m"}})
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=storage.build(body=body))
    assert not patch and storage.fetch(body=body) is None


def test_kopf_s_essence_of_a_run_is_its_own_without_copying_the_status():
    status = {"phase": "Training", "events": [{"type": "TRAIN_UPDATED", "message": "m" * 200}] * 50}
    raw = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
           "metadata": {"name": "r", "uid": "u", "resourceVersion": "7", "labels": {"team": "a"},
                        "annotations": {"note": "x", "kopf.kubetune.dev/last-handled-configuration": "{}"}},
           "spec": {"model": "m"}, "status": status}
    ours = UnkeptDiffBase(prefix="kopf.kubetune.dev").build(body=kopf.Body(raw))
    assert ours == kopf.AnnotationsDiffBaseStorage(prefix="kopf.kubetune.dev").build(body=kopf.Body(raw))
    assert ours == {"spec": {"model": "m"}, "metadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}}}


class Creating(Cluster):
    """Cluster whose creates succeed, or find the object made already (409), without a server."""

    def __init__(self, conflict: bool = False):
        super().__init__(ChildStore(), client.ApiClient(client.Configuration()), EventPoster(threads=0))
        self.conflict, self.posted = conflict, []

    def _post(self, manifest):
        self.posted.append(manifest["metadata"]["name"])
        if self.conflict:
            raise ApiException(status=409)


def job_manifest(name: str = "r-prep") -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "spec": {"completions": 1},
            "metadata": {"name": name, "namespace": "ns", "labels": {"kubetune.dev/run": "r"}}}


def test_a_child_we_created_stands_in_until_the_watch_delivers_it():
    cluster = Creating()
    cluster.create(job_manifest())
    assert [j["metadata"]["name"] for j in cluster.children("ns", "r")["jobs"]] == ["r-prep"]
    assert cluster.children("ns", "other")["jobs"] == []
    watched = {**job_manifest(), "status": {"active": 1}}
    cluster.store.put("jobs", watched)  # the watch caught up: its copy, once
    assert cluster.children("ns", "r")["jobs"] == [watched]
    cluster.store.remove("jobs", watched)  # and a deletion after that is seen as one
    assert cluster.children("ns", "r")["jobs"] == []


def test_a_stand_in_goes_with_a_delete_its_time_or_a_conflict(monkeypatch):
    cluster = Creating()
    cluster.create(job_manifest("r-train-1"))
    cluster.rest = Answering()
    cluster.delete(ChildRef("Job", "r-train-1", "ns"))
    assert cluster.rest.sent == [("DELETE", "/apis/batch/v1/namespaces/ns/jobs/r-train-1",
                                  {"body": {"propagationPolicy": "Foreground"}})]
    assert cluster.children("ns", "r")["jobs"] == []
    cluster.create(job_manifest("r-train-2"))
    monkeypatch.setattr(time, "monotonic", lambda: float("inf"))  # CREATED_TTL has passed
    assert cluster.children("ns", "r")["jobs"] == []
    monkeypatch.undo()
    conflicted = Creating(conflict=True)
    conflicted.create(job_manifest())  # made by an earlier tick: the watch will bring it
    assert conflicted.posted == ["r-prep"] and conflicted.children("ns", "r")["jobs"] == []
