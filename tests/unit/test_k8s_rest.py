"""The operator's raw REST calls: paths, credentials, query, body and errors as an API server sees them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.k8s.rest import MERGE_PATCH, Rest, collection, member


@pytest.fixture()
def server():
    """An HTTP server answering each request with what it was asked: 404 for a path with
    `missing` in it, a body of three lines for a watch."""
    seen = []

    class Echo(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            asked = {"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"),
                     "type": self.headers.get("Content-Type"),
                     "body": json.loads(self.rfile.read(length)) if length else None}
            seen.append(asked)
            status = 404 if "missing" in self.path else 200
            reply = (b'{"type":"ADDED"}\n{"type":"MODIFIED"}\n{"type":"DELETED"}\n' if "watch=true" in self.path
                     else json.dumps({"kind": "Status", "code": status, **asked}).encode())
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, *_):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    configuration = client.Configuration(host=f"http://127.0.0.1:{httpd.server_port}",
                                         api_key={"authorization": "Bearer s3cret"})
    yield Rest(client.ApiClient(configuration)), seen
    httpd.shutdown()


def test_paths_of_core_grouped_and_custom_kinds():
    assert collection("v1", "pods") == "/api/v1/pods"
    assert collection("v1", "pods", "team-a") == "/api/v1/namespaces/team-a/pods"
    assert collection("batch/v1", "jobs", "ns") == "/apis/batch/v1/namespaces/ns/jobs"
    assert member("kubetune.dev/v1alpha1", "trainingruns", "ns", "r", "status") == \
        "/apis/kubetune.dev/v1alpha1/namespaces/ns/trainingruns/r/status"


def test_a_request_carries_the_token_its_query_and_its_body(server):
    rest, seen = server
    answer = rest.json("PATCH", member("kubetune.dev/v1alpha1", "trainingruns", "ns", "r", "status"),
                       body={"status": {"phase": "Training"}}, content_type=MERGE_PATCH)
    assert answer["method"] == "PATCH" and answer["auth"] == "Bearer s3cret"
    assert answer["type"] == MERGE_PATCH and answer["body"] == {"status": {"phase": "Training"}}
    rest.send("GET", collection("v1", "pods"), query=[("labelSelector", "kubetune.dev/run")])
    assert seen[-1]["path"] == "/api/v1/pods?labelSelector=kubetune.dev/run"
    assert seen[-1]["type"] is None and seen[-1]["body"] is None


def test_an_answer_but_2xx_raises_with_its_status(server):
    rest, _ = server
    with pytest.raises(ApiException) as raised:
        rest.send("DELETE", member("batch/v1", "jobs", "ns", "missing"), body={"propagationPolicy": "Foreground"})
    assert raised.value.status == 404 and json.loads(raised.value.body)["code"] == 404


def test_a_watch_streams_its_lines(server):
    from kubernetes.watch.watch import iter_resp_lines

    rest, _ = server
    response = rest.request("GET", collection("v1", "pods"), query=[("watch", "true")], timeout=(5, 5))
    try:
        assert [json.loads(line)["type"] for line in iter_resp_lines(response)] == ["ADDED", "MODIFIED", "DELETED"]
    finally:
        response.release_conn()


def test_the_operator_shell_never_imports_the_typed_core_and_batch_apis():
    """They cost ~23 MB of the operator's memory and it reads and writes plain dicts."""
    code = ("import sys, kubetune.k8s.main, kubetune.k8s.handlers, kubetune.k8s.cluster, kubetune.k8s.informer; "
            "print(sorted(m for m in sys.modules if m.endswith(('core_v1_api', 'batch_v1_api'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
