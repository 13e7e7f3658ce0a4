"""The e2e site (`site.py`) without a cluster: what a real cluster needs, the tool Jobs' manifests
for both places, and the seed program run here on the repo's data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from kubetune.settings import OperatorSettings
from tests.chart.tools import render
from tests.unit.test_manifests import K8S_VERSION, restricted_violations

from .site import (
    E2E_INTERVALS,
    ENV_ACCESS_MODE,
    ENV_IMAGE,
    ENV_MLFLOW,
    SEED_SCRIPT,
    SiteUnavailable,
    chart_values,
    kubelet_site,
    local_site,
    real_site,
    seed_config_map,
    seed_files,
    seed_items,
    storage_claim,
    tool_job,
)

REAL_ENV = {ENV_IMAGE: "registry.example/kubetune/trainer:dev", ENV_MLFLOW: "http://mlflow.example:5000"}


def test_a_real_cluster_needs_the_trainer_image_and_an_mlflow_server():
    with pytest.raises(SiteUnavailable, match=f"{ENV_IMAGE} and {ENV_MLFLOW}"):
        real_site({})
    with pytest.raises(SiteUnavailable, match=ENV_MLFLOW):
        real_site({ENV_IMAGE: "x"})
    with pytest.raises(SiteUnavailable, match=ENV_ACCESS_MODE):
        real_site({**REAL_ENV, ENV_ACCESS_MODE: "ReadOnlyMany"})


def test_on_a_real_cluster_the_operator_runs_the_image_and_mounts_a_claim_per_namespace(tiny_model_dir):
    site = real_site(REAL_ENV)
    settings = OperatorSettings.from_env(site.operator_env())
    assert settings.trainer_image == REAL_ENV[ENV_IMAGE]
    assert settings.trainer_command == ["python", "-m", "kubetune_trainer"]
    assert settings.storage_uri is None and settings.mlflow_tracking_uri == REAL_ENV[ENV_MLFLOW]
    # The tool Jobs mount the claim where the operator mounts it in the training pods.
    job = tool_job(site, "ns", "e2e-seed", ["seed"], seed_items(seed_files(tiny_model_dir)))
    pod = job["spec"]["template"]["spec"]
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == settings.storage_claim_name
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == claim["name"])
    assert mount["mountPath"] == settings.storage_mount_path == site.storage_root


def test_locally_the_operator_runs_this_interpreter_on_a_folder(tmp_path):
    site = local_site(tmp_path, "http://127.0.0.1:5000")
    settings = OperatorSettings.from_env(site.operator_env())
    assert settings.trainer_command[0] == sys.executable
    assert settings.storage_uri == str(tmp_path) and settings.storage_claim_name is None
    pod = tool_job(site, "ns", "e2e-seed", ["seed"], [])["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])


def test_on_real_nodes_the_chart_installs_the_operator_with_the_site_settings(tmp_path):
    """What the session's `helm install` gets on real nodes of this machine: the operator reads
    the site's settings and the e2e intervals from the chart's ConfigMap and env, and no image is
    pulled (they are built here)."""
    site = kubelet_site("localhost/kubetune/trainer:0123", "http://10.200.255.1:5000", "kubetune-local",
                        lambda namespace, claim: {})
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(site, "localhost/kubetune/operator:4567")))
    objects = render("default", "-f", str(values))
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert (container["image"], container["imagePullPolicy"]) == ("localhost/kubetune/operator:4567", "Never")
    settings = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-settings"))
    env = {**settings["data"], **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    wanted = {**site.operator_env(), **E2E_INTERVALS}
    assert {name: env.get(name) for name in wanted} == wanted
    operator = OperatorSettings.from_env(env)
    assert operator.trainer_image == site.trainer_image and operator.image_pull_policy == "Never"
    assert operator.cpu_fallback and operator.storage_claim_name == "kubetune-e2e"
    assert restricted_violations(deployment["spec"]["template"]["spec"]) == []


@pytest.mark.parametrize("where", ["local", "real"])
def test_the_tool_objects_are_valid_kubernetes_and_restricted(where, tmp_path, tiny_model_dir):
    site = local_site(tmp_path, "http://127.0.0.1:5000") if where == "local" else real_site(REAL_ENV)
    job = tool_job(site, "ns", "e2e-seed", ["seed"], seed_items(seed_files(tiny_model_dir)))
    config_map = seed_config_map("ns", tiny_model_dir)
    for manifest in (job, config_map, storage_claim(site, "ns")):
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    assert restricted_violations(job["spec"]["template"]["spec"]) == []
    assert len(json.dumps(config_map)) < 1_000_000  # an object in etcd holds at most 1.5 MiB; a ConfigMap 1 MiB


def test_the_seed_program_stages_a_loadable_model_and_the_data(tmp_path, tiny_model_dir):
    """What the seed Job does, run here on the files as its ConfigMap volume lays them out."""
    mounted = tmp_path / "seed"
    for path, source in seed_files(tiny_model_dir).items():
        (mounted / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, mounted / path)
    root = tmp_path / "storage" / "ns" / "e2e-inputs"
    subprocess.run([sys.executable, str(SEED_SCRIPT), "seed", "--from", str(mounted),
                    "--to", str(root), "--long-copies", "3"], check=True, capture_output=True)

    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(root / "model").model_type == "llama"
    assert AutoTokenizer.from_pretrained(root / "model").chat_template
    assert (root / "model" / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    ift = (root / "data" / "ift.jsonl").read_text()
    assert (root / "data" / "ift-long.jsonl").read_text() == ift * 3
    assert sorted(p.name for p in (root / "data" / "cpt").rglob("*.txt"))
    shown = subprocess.run([sys.executable, str(SEED_SCRIPT), "cat", str(root / "data" / "ift.jsonl")],
                           check=True, capture_output=True, text=True).stdout
    assert shown == ift
