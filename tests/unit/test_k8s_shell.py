"""The parts of the kopf shell that need no API server: naming, scraping, options."""

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from kubetune.k8s.cluster import camel
from kubetune.k8s.handlers import scrape
from kubetune.k8s.main import RuntimeOptions

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


def test_runtime_options_from_env():
    options = RuntimeOptions.from_env({"KUBETUNE_WATCH_NAMESPACES": "a,b", "KUBETUNE_RECONCILE_INTERVAL": "2",
                                       "KUBETUNE_LEADER_ELECTION": "false", "POD_NAMESPACE": "ops"})
    assert options.namespaces == ("a", "b") and options.interval == 2.0
    assert not options.leader_election and options.lease_namespace == "ops"
    assert RuntimeOptions.from_env({}).namespaces == ()


class CountingCluster:
    """A Cluster stand-in that records every API call the shell makes."""

    def __init__(self, run: dict):
        self.run, self.calls = run, []

    def get_run(self, namespace, name):
        self.calls.append("get")
        return self.run

    def children(self, namespace, name):
        self.calls.append("list")
        return {"jobs": [], "pods": [], "config_maps": [], "services": []}

    def delete_run(self, namespace, name):
        self.calls.append("delete_run")

    def __getattr__(self, name):  # create, delete, patch_status, post_event
        return lambda *args, **kwargs: self.calls.append(name)


def finished_run(rv: str = "7", ttl: int | None = None, finished_ago: int = 5) -> dict:
    from datetime import datetime, timedelta, timezone

    done = (datetime.now(timezone.utc) - timedelta(seconds=finished_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    spec = {"model": "m", "trainDataPath": "/d.jsonl", "registerTo": "a.b"}
    if ttl is not None:
        spec["ttlSecondsAfterFinished"] = ttl
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u-1", "resourceVersion": rv},
            "spec": spec, "status": {"phase": "Succeeded", "completionTime": done}}


def test_a_quiet_finished_run_costs_no_api_call_until_it_changes():
    from kubetune.k8s.handlers import QuietRuns, reconcile
    from kubetune.settings import OperatorSettings

    settings, quiet = OperatorSettings(), QuietRuns()
    run = finished_run()
    cluster = CountingCluster(run)
    reconcile(cluster, "ns", "r", settings, quiet, run)  # first look: fresh, finds nothing left
    assert cluster.calls == ["get", "list"]
    for _ in range(3):
        reconcile(cluster, "ns", "r", settings, quiet, run)
    assert cluster.calls == ["get", "list"]  # the ticks after cost nothing

    edited = finished_run(rv="8", ttl=0)  # the user changed it: look again, and its TTL acts
    cluster.run = edited
    reconcile(cluster, "ns", "r", settings, quiet, edited)
    assert cluster.calls[2:] == ["get", "list", "delete_run"]

    quiet.forget("u-1")
    reconcile(cluster, "ns", "r", settings, quiet, run)
    assert cluster.calls[5:7] == ["get", "list"]  # forgotten (deleted, re-created): fresh again


def test_a_quiet_finished_run_is_still_deleted_when_its_ttl_runs_out():
    from kubetune.k8s.handlers import QuietRuns, reconcile
    from kubetune.settings import OperatorSettings

    settings, quiet = OperatorSettings(), QuietRuns()
    waiting = finished_run(ttl=3600)
    cluster = CountingCluster(waiting)
    reconcile(cluster, "ns", "r", settings, quiet, waiting)
    reconcile(cluster, "ns", "r", settings, quiet, waiting)
    assert cluster.calls == ["get", "list"]
    expired = finished_run(ttl=3600, finished_ago=3601)  # same object, an hour later
    reconcile(cluster, "ns", "r", settings, quiet, expired)
    assert cluster.calls == ["get", "list", "delete_run"]


def test_a_finished_run_with_a_live_job_is_looked_at_again():
    from kubetune.k8s.handlers import QuietRuns, reconcile
    from kubetune.settings import OperatorSettings

    quiet, run = QuietRuns(), finished_run()
    cluster = CountingCluster(run)
    live = {"metadata": {"name": "r-train-1", "namespace": "ns",
                         "labels": {"kubetune.dev/run": "r", "kubetune.dev/component": "train",
                                    "kubetune.dev/attempt": "1"}},
            "spec": {}, "status": {"active": 1}}
    cluster.children = lambda namespace, name: (cluster.calls.append("list") or
                                                {"jobs": [live], "pods": [], "config_maps": [], "services": []})
    reconcile(cluster, "ns", "r", OperatorSettings(), quiet, run)
    reconcile(cluster, "ns", "r", OperatorSettings(), quiet, run)
    assert cluster.calls.count("list") == 2 and "delete" in cluster.calls and not quiet.holds(run)
