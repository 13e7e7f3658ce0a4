"""Write the Argo CD health test objects from the operator's own status code.

    python tools/argocd_testdata.py             # (re)write argocd/.../TrainingRun/testdata/
    python tools/argocd_testdata.py --out DIR   # write them elsewhere (the tests judge fresh ones)

Each object is a TrainingRun whose status `kubetune.reconcile.decide` wrote, step by step, from
observations of its Jobs and pods (the same path the operator takes), so the health script is
tested against what the operator really writes: tests/chart runs health_test.yaml on objects
made by the current code, so a status change that alters a verdict fails there. The e2e chart
test judges live objects too (tests/e2e/test_helm_chart.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer-image")]

from kubetune.api import TrainingRunStatus  # noqa: E402
from kubetune.manifests import Component  # noqa: E402
from kubetune.reconcile import JobState, Observed, PodState, decide  # noqa: E402
from kubetune.settings import OperatorSettings  # noqa: E402

TESTDATA = REPO / "argocd" / "resource_customizations" / "kubetune.dev" / "TrainingRun" / "testdata"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings(trainer_image="ghcr.io/kubetune/trainer:0.1.0")
SPEC = {"model": "meta-llama/Llama-3.2-1B-Instruct", "taskType": "CHAT_COMPLETION",
        "trainDataPath": "/mnt/kubetune/data/chats.jsonl", "registerTo": "main.ml.support_bot",
        "trainingDuration": "2ep"}
STATS = {"samples": 1200, "tokens": 480000, "truncatedSamples": 3, "sequences": 240,
         "packingEfficiency": 0.93}
PROGRESS = {"percent": 42.0, "batchesDone": 63, "batchesTotal": 150, "tokensPerSecond": 5230.5,
            "loss": 1.42, "etaSeconds": 610.0, "latestCheckpoint": "/mnt/kubetune/team/support-bot/checkpoints/ep0-ba60-rank0.pt",
            "mlflow": {"experimentId": "7", "runId": "0f3c9a"}}
MODEL = {"name": "main.ml.support_bot", "version": "3",
         "artifactUri": "mlflow-artifacts:/7/0f3c9a/artifacts/model"}


def body(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": "support-bot", "namespace": "team", "generation": 1,
                         "uid": "5d0b6c1e-2f43-4d8e-9a51-7e2b0c9f1a33"},
            "spec": {**SPEC, **spec}, "status": {}}


def pod(phase: str, exit_code: int | None = None, result: dict | None = None) -> PodState:
    return PodState(name="support-bot-pod", phase=phase, index=0, exit_code=exit_code, result=result)


def job(component: Component, attempt: int = 0, **kw: Any) -> JobState:
    name = {Component.PREP: "support-bot-prep", Component.FINALIZE: "support-bot-finalize"}.get(
        component, f"support-bot-train-{attempt}")
    return JobState(name=name, component=component, attempt=attempt, **kw)


def done(component: Component, result: dict, attempt: int = 0) -> JobState:
    return job(component, attempt, complete=True, succeeded=1,
               pods=(pod("Succeeded", 0, {"ok": True, **result}),))


def step(run: dict, observed: Observed) -> dict:
    plan = decide(run, observed, NOW, SETTINGS)
    status = {**run["status"], **plan.status}
    TrainingRunStatus.model_validate(status)  # what the API server would accept
    return {**run, "status": status}


PREP_DONE = done(Component.PREP, {"dataStats": STATS})
WORLD = Observed(config_map=True, service=True, prep=PREP_DONE)


def scenarios() -> dict[str, dict]:
    fresh = step(body(), Observed())
    training = step(step(fresh, Observed(config_map=True, prep=PREP_DONE)),
                    replace(WORLD, train=(job(Component.TRAIN, 1, active=1, pods=(pod("Running"),)),),
                            progress=PROGRESS))
    trained = step(training, replace(WORLD, train=(done(Component.TRAIN, {}, 1),)))
    succeeded = step(trained, replace(WORLD, train=(done(Component.TRAIN, {}, 1),),
                                      finalize=done(Component.FINALIZE, {"registeredModel": MODEL})))
    retried = step(training, replace(WORLD, train=(job(
        Component.TRAIN, 1, pods=(pod("Failed", 1, {"ok": False, "reason": "NcclTimeout",
                                                    "message": "rank 1 timed out", "permanent": False}),)),)))
    bad_data = step(fresh, Observed(config_map=True, prep=job(
        Component.PREP, failed_reason="PodFailurePolicy",
        pods=(pod("Failed", 2, {"ok": False, "reason": "DataValidationFailed", "permanent": True,
                                "message": "chats.jsonl line 7: the last message must be from the assistant"}),))))
    queued_spec = {"scheduling": {"queueName": "team-gpus"}, "resources": {"gpusPerNode": 8}}
    queued = step(step(body(**queued_spec), Observed()),
                  Observed(config_map=True, prep=job(Component.PREP, suspended=True)))
    suspended = step({**training, "spec": {**training["spec"], "suspend": True}},
                     replace(WORLD, train=(job(Component.TRAIN, 1, active=1),)))
    cancelled = step({**training, "metadata": {**training["metadata"],
                                               "annotations": {"kubetune.dev/cancel": "true"}}},
                     replace(WORLD, train=(job(Component.TRAIN, 1, active=1),)))
    edited = {**succeeded, "metadata": {**succeeded["metadata"], "generation": 2},
              "spec": {**succeeded["spec"], "trainingDuration": "3ep"}}
    return {
        "new.yaml": {**body(), "status": {}},
        "preparing.yaml": fresh,
        "training.yaml": training,
        "retrying.yaml": retried,
        "registering.yaml": trained,
        "succeeded.yaml": succeeded,
        "queued.yaml": queued,
        "suspended.yaml": suspended,
        "cancelled.yaml": cancelled,
        "failed-bad-data.yaml": bad_data,
        "failed-invalid-spec.yaml": step(body(trainingDuration="3 epochs"), Observed()),
        "spec-edited-not-observed.yaml": edited,
    }


def render(run: dict) -> str:
    run = dict(run)
    if not run.get("status"):
        run.pop("status", None)
    return ("# Generated by `python tools/argocd_testdata.py` from kubetune.reconcile.decide.\n"
            + yaml.safe_dump(run, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TESTDATA, help="folder to write the objects to")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, run in scenarios().items():
        (args.out / name).write_text(render(run))
    return 0

if __name__ == "__main__":
    sys.exit(main())
