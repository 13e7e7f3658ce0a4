"""Pure parts of local mode: how it plays the API server and the kubelet."""

from pathlib import Path

from kubetune.kubelet import expand
from kubetune.local import (
    LocalJob,
    LocalPod,
    absolutize,
    container_env,
    local_body,
    merge_patch,
)


def test_merge_patch_follows_rfc7386():
    target = {"phase": "Training", "progress": {"percent": 10, "loss": 2.0}, "attempts": 1}
    patch = {"progress": {"percent": 50, "loss": None}, "attempts": None, "phase": "Registering"}
    assert merge_patch(target, patch) == {"phase": "Registering", "progress": {"percent": 50}}


def test_lists_are_replaced_not_merged():
    assert merge_patch({"events": [1, 2]}, {"events": [3]}) == {"events": [3]}


def test_expand_substitutes_known_variables_only():
    assert expand("--node-rank $(NODE_RANK) $(UNKNOWN) $$(NODE_RANK)", {"NODE_RANK": "1"}) == (
        "--node-rank 1 $(UNKNOWN) $(NODE_RANK)")


def test_relative_paths_resolve_against_the_caller_but_hub_ids_and_uris_do_not(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}")
    spec = {"model": "meta-llama/Llama-3.1-8B-Instruct", "trainDataPath": "data.jsonl",
            "evalDataPath": "s3://bucket/eval.jsonl", "customWeightsPath": "./ckpt/latest-rank0.pt"}
    out = absolutize(spec, tmp_path)
    assert out["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert out["trainDataPath"] == str(tmp_path / "data.jsonl")
    assert out["evalDataPath"] == "s3://bucket/eval.jsonl"
    assert out["customWeightsPath"] == str(tmp_path / "ckpt" / "latest-rank0.pt")


def test_local_body_uid_is_stable_per_workdir(tmp_path):
    doc = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "r"},
           "spec": {"model": "m"}}
    first, again = local_body(doc, tmp_path, tmp_path / "w"), local_body(doc, tmp_path, tmp_path / "w")
    other = local_body(doc, tmp_path, tmp_path / "w2")
    assert first["metadata"]["uid"] == again["metadata"]["uid"] != other["metadata"]["uid"]
    assert first["metadata"]["namespace"] == "default"


def test_container_env_resolves_the_downward_api_and_points_rank0_at_loopback(monkeypatch):
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "leaks-operator-settings")
    container = {"env": [
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "MASTER_ADDR", "value": "r-train-1-0.r-train.default.svc"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
    ]}
    env = container_env(container, "r-train-1-1", 1, "default", Path("/tmp/stage"))
    assert env["NODE_RANK"] == "1" and env["POD_IP"] == "127.0.0.1" and env["MASTER_ADDR"] == "127.0.0.1"
    assert "KUBETUNE_TRAINER_IMAGE" not in env
    assert "HF_TOKEN" not in env or env["HF_TOKEN"] != ""


JOB = {"apiVersion": "batch/v1", "kind": "Job",
       "metadata": {"name": "r-prep", "namespace": "default",
                    "labels": {"kubetune.dev/run": "r", "kubetune.dev/component": "prep"}},
       "spec": {"backoffLimit": 1, "template": {
           "metadata": {"labels": {"kubetune.dev/run": "r"}},
           "spec": {"containers": [{"name": "prepare", "terminationMessagePolicy": "FallbackToLogsOnError"}]}}}}


def finished_pod(tmp_path: Path, code: int, result: str = "", log: str = "", restarts: int = 0) -> LocalPod:
    import subprocess
    import sys

    pod = LocalPod("r-prep-0", 0, [], {}, tmp_path, restarts=restarts)
    pod.result_file.write_text(result)
    pod.log_file.write_text(log)
    pod.process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    pod.process.wait()
    return pod


def test_a_local_job_is_shown_in_the_apis_shape_that_observe_reads(tmp_path):
    from kubetune.reconcile import observe

    ok = LocalJob(JOB, [finished_pod(tmp_path, 0, result='{"ok": true, "dataStats": {"samples": 3}}')])
    job, pods = ok.api_objects(permanent_exit=2)
    observed = observe(jobs=[job], pods=pods)
    assert observed.prep.done and observed.prep.result()["dataStats"] == {"samples": 3}
    assert pods[0]["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "r-prep"


def test_a_crash_without_a_result_shows_the_log_tail_and_retries_within_backoff_limit(tmp_path):
    from kubetune.reconcile import observe

    crashed = LocalJob(JOB, [finished_pod(tmp_path, 1, log="Traceback ...\nMemoryError")])
    job, pods = crashed.api_objects(permanent_exit=2)
    observed = observe(jobs=[job], pods=pods)
    assert observed.prep.failed_reason is None  # one retry left: the Job controller would retry
    assert observed.prep.pods[0].message.endswith("MemoryError")
    spent = LocalJob(JOB, [finished_pod(tmp_path, 1, log="boom", restarts=1)])
    assert observe(jobs=[spent.api_objects(2)[0]]).prep.failed_reason == "BackoffLimitExceeded"
    permanent = LocalJob(JOB, [finished_pod(tmp_path, 2, result='{"ok": false, "permanent": true}')])
    assert observe(jobs=[permanent.api_objects(2)[0]]).prep.failed_reason == "BackoffLimitExceeded"
