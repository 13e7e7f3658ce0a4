"""Bad input against the real API server and operator, while a good run goes on beside it.

One namespace holds it all: every spec of the corpus (tests/unit/crd_cases/invalid.yaml) is sent
with the real kubectl and refused by the CRD's schema and CEL rules; the runs only the operator
can judge (a model's context window, a model path, a Secret, object-store credentials) end
`Failed` with a reason, and so does a run whose training data is broken (its records named by
file:line); meanwhile a good run that references canary Secrets succeeds, and no
canary value appears in any status, event, ConfigMap, pod log or the operator's log.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from .conftest import apply, log_size, trainingrun, wait_phase
from .site import Inputs

pytestmark = pytest.mark.cluster
RUN_TIMEOUT = 420  # as test_lifecycle: a loaded CI machine takes minutes for one run
CANARY = "kt-canary-7f3a9c1e"  # every Secret value below holds it; no output may
CASES = Path(__file__).parents[1] / "unit" / "crd_cases" / "invalid.yaml"
BROKEN_DATA = "ift_broken.jsonl"  # a JSONL file of bad records (tests/trainer/data/broken)
CORPUS = [case for case in yaml.safe_load(CASES.read_text()) if "status" not in case and "why" not in case]


def spec_of(inputs: Inputs, **extra) -> dict:
    return {"model": inputs.model, "trainDataPath": inputs.data("ift.jsonl"), "registerTo": "main.e2e.bad_input",
            "trainingDuration": "1ba", "learningRate": 1e-3, "contextLength": 128, "globalBatchSize": 8, **extra}


def canary_secrets(namespace: str) -> list[dict]:
    def secret(name: str, data: dict) -> dict:
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                "stringData": data}
    return [secret("hf", {"token": f"hf_{CANARY}"}),
            secret("mlflow-creds", {"MLFLOW_TRACKING_USERNAME": "ci", "MLFLOW_TRACKING_PASSWORD": f"mlflow-{CANARY}"}),
            secret("store-creds", {"AWS_ACCESS_KEY_ID": f"AKIA{CANARY}", "AWS_SECRET_ACCESS_KEY": f"s3-{CANARY}"})]


def leaf(field: str) -> str:
    """What the API server's message names of `spec.scheduling.tolerations[0].operator`."""
    return re.sub(r"\[.*?\]", "", field.split(".")[-1])


def refusal(kubectl, namespace: str, index: int, case: dict) -> tuple[str, int, str]:
    name = (case.get("metadata") or {}).get("name") or f"bad-{index}"
    obj = {**trainingrun(name, case["spec"]), "metadata": {"name": name, "namespace": namespace}}
    # JSON, not YAML: the types sent are exactly the corpus's (YAML dialects differ on `1e-5`)
    result = kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
    return case["name"], result.returncode, result.stderr


def test_bad_specs_are_refused_and_failed_with_reasons_while_a_good_run_succeeds_and_no_secret_leaks(
        operator, kubectl, namespace, inputs, site):
    since = log_size(operator)
    apply(kubectl, canary_secrets(namespace))
    secrets = {"hfToken": {"name": "hf", "key": "token"}, "mlflow": {"name": "mlflow-creds"},
               "objectStore": {"name": "store-creds"}}
    operator_judged = {  # admitted by the CRD; the operator fails them with this reason
        "too-long-context": ("InvalidSpec", spec_of(inputs, model="google/gemma-2-9b-it", contextLength=16384)),
        "no-such-secret": ("SecretNotFound", spec_of(inputs, secrets={"hfToken": {"name": "nope", "key": "token"}})),
        "no-such-model": ("ModelNotFound", spec_of(inputs, model=f"{inputs.root}/no-such-model")),
        "s3-no-credentials": ("MissingCredentials", spec_of(inputs, trainDataPath="s3://kubetune-e2e/train.jsonl")),
        "bad-data": ("DataValidationFailed", spec_of(inputs, trainDataPath=inputs.data(BROKEN_DATA))),
    }
    apply(kubectl, [{**trainingrun("good", spec_of(inputs, secrets=secrets)),
                     "metadata": {"name": "good", "namespace": namespace}}]
          + [{**trainingrun(name, spec), "metadata": {"name": name, "namespace": namespace}}
             for name, (_, spec) in operator_judged.items()])

    with ThreadPoolExecutor(4) as pool:  # the corpus, while those runs go on
        refusals = list(pool.map(lambda item: refusal(kubectl, namespace, *item), enumerate(CORPUS)))
    assert [name for name, code, _ in refusals if code == 0] == []  # admitted: none
    for (name, _, stderr), case in zip(refusals, CORPUS):
        assert leaf(case["apiError"].split(":")[0]) in stderr, (name, stderr)

    for name, (reason, _) in operator_judged.items():
        run = wait_phase(kubectl, namespace, name, {"Failed", "Succeeded"}, RUN_TIMEOUT, operator)
        failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
        assert (run["status"]["phase"], failed["reason"]) == ("Failed", reason), (name, failed)
        assert "Traceback" not in failed["message"]
        if name == "bad-data":  # judged by the prepare Job: each bad record by file:line and rule
            assert f"{inputs.data(BROKEN_DATA)}:3: missing key 'response'" in failed["message"], failed
    good = wait_phase(kubectl, namespace, "good", {"Failed", "Succeeded"}, RUN_TIMEOUT, operator)
    assert good["status"]["phase"] == "Succeeded", json.dumps(good["status"])[:3000]

    # The canary: referenced by the good run's pods, copied nowhere.
    seen = [kubectl("get", "trainingruns,events,configmaps,jobs,pods", "-n", namespace, "-o", "json").stdout,
            operator.log.read_bytes()[since:].decode(errors="replace")]
    for pod in kubectl.json("get", "pods", "-n", namespace)["items"]:
        for container in pod["spec"]["containers"]:
            seen.append(kubectl("logs", pod["metadata"]["name"], "-n", namespace, "-c", container["name"],
                                check=False).stdout)
    assert len(seen) > 3  # the good run's prep, train and finalize pods, at least
    leaks = [text[max(0, text.find(CANARY) - 200):text.find(CANARY) + 50] for text in seen if CANARY in text]
    assert leaks == []
    assert "Traceback" not in seen[1]
