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
