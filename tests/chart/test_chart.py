"""The Helm chart, rendered by the real helm: lint, helm-unittest suites, Kubernetes 1.35 schemas
(kubeconform -strict), Pod Security `restricted` and the RBAC allow-list on what is rendered, and
the chart's copies (CRD, rules, dashboard) kept equal to their one source."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from kubetune import rbac

from .tools import CHART, REPO, VALUE_SETS, go_tool, helm, kubeconform, render, run, values_args

OPERATOR_KINDS = {"Deployment", "ServiceAccount", "ConfigMap", "Service", "ClusterRole", "PersistentVolumeClaim",
                  "ClusterRoleBinding", "Role", "RoleBinding", "CustomResourceDefinition", "Lease"}


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def test_chart_copies_are_current():
    proc = run([sys.executable, REPO / "tools" / "chart_sync.py", "--check"])
    assert proc.returncode == 0, proc.stderr


def test_chart_crd_is_the_generated_crd_with_argocd_sync_options():
    source = yaml.safe_load((REPO / "crds" / "trainingruns.kubetune.dev.yaml").read_text())
    copy = yaml.safe_load((CHART / "crds" / "trainingruns.kubetune.dev.yaml").read_text())
    annotations = copy["metadata"].pop("annotations")
    assert annotations["argocd.argoproj.io/sync-options"] == "ServerSideApply=true"
    assert copy == source


def test_the_gpu_resource_value_is_checked_as_the_operator_checks_it():
    from kubetune.api import RESOURCE_NAME_PATTERN
    from kubetune.settings import OperatorSettings
    schema = json.loads((CHART / "values.schema.json").read_text())
    value = schema["properties"]["defaults"]["properties"]["gpuResource"]
    assert value["pattern"] == RESOURCE_NAME_PATTERN
    default = yaml.safe_load((CHART / "values.yaml").read_text())["defaults"]["gpuResource"]
    assert default == OperatorSettings().gpu_resource


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint(value_set):
    proc = run([helm(), "lint", "--strict", CHART, *values_args(value_set)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm_unittest_suites():
    proc = run([go_tool("helm-unittest"), "--color=false", CHART])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr
    assert "Tests:" in proc.stdout and " 0 passed" not in proc.stdout.split("Tests:")[1].splitlines()[0]


def test_every_rendered_object_matches_the_kubernetes_1_35_schemas():
    """Every value set's objects in one kubeconform run (its schemas load once)."""
    objects = [o for value_set in VALUE_SETS for o in render(value_set)]
    proc = kubeconform(yaml.safe_dump_all(objects))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Valid: {len(objects)}," in proc.stdout, proc.stdout


def test_the_schema_check_catches_a_mistyped_field():
    deployment = by_kind(render(), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    proc = kubeconform(yaml.safe_dump(deployment))
    assert proc.returncode != 0 and "imagePullPolcy" in proc.stdout, proc.stdout


def restricted_violations(pod_spec: dict) -> list[str]:
    """Pod Security Standards `restricted` (v1.35), the checks a pod template can fail."""
    problems = []
    pod_sc = pod_spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(flag):
            problems.append(flag)
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
    for volume in pod_spec.get("volumes") or []:
        if not set(volume) - {"name"} <= allowed_volumes:
            problems.append(f"volume {volume['name']}")
    for c in (pod_spec.get("initContainers") or []) + pod_spec["containers"]:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            problems.append(f"{where}: runAsNonRoot")
        if 0 in (sc.get("runAsUser"), pod_sc.get("runAsUser")):
            problems.append(f"{where}: runAsUser 0")
        profile = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if profile not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            problems.append(f"{where}: hostPort")
    return problems


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_operator_pod_meets_pod_security_restricted(value_set):
    deployment = by_kind(render(value_set), "Deployment")[0]
    assert restricted_violations(deployment["spec"]["template"]["spec"]) == []
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_restricted_check_catches_a_privileged_operator():
    deployment = by_kind(render("default", "--set", "securityContext.allowPrivilegeEscalation=true"),
                         "Deployment")[0]
    assert restricted_violations(deployment["spec"]["template"]["spec"]) == [
        "container operator: allowPrivilegeEscalation must be false"]


def rules_of(objects: list[dict], kind: str) -> dict[str, list]:
    return {o["metadata"].get("namespace", ""): o["rules"] for o in by_kind(objects, kind)}


def cluster_roles(objects: list[dict]) -> dict[str, list]:
    return {o["metadata"]["name"]: o["rules"] for o in by_kind(objects, "ClusterRole")}


USER_ROLES = {"kt-kubetune-view": rbac.user_rules()["view"], "kt-kubetune-edit": rbac.user_rules()["edit"]}


def test_cluster_wide_rbac_is_exactly_kubetune_rbac():
    objects = render()
    assert cluster_roles(objects) == {"kt-kubetune": rbac.operator_rules(cluster_wide=True), **USER_ROLES}
    assert [b["roleRef"]["name"] for b in by_kind(objects, "ClusterRoleBinding")] == ["kt-kubetune"]
    assert rules_of(objects, "Role") == {"kubetune-system": rbac.leader_election_rules()}
    assert {o["kind"] for o in objects} <= OPERATOR_KINDS


def test_namespaced_rbac_is_a_role_per_namespace_and_nothing_cluster_scoped():
    objects = render("namespaced")
    namespaced = rbac.operator_rules(cluster_wide=False)
    assert rules_of(objects, "Role") == {"team-a": namespaced, "team-b": namespaced,
                                         "kubetune-system": rbac.leader_election_rules()}
    # Cluster-scoped only the user roles, bound to no one: the operator has no cluster-wide right.
    assert cluster_roles(objects) == USER_ROLES and by_kind(objects, "ClusterRoleBinding") == []
    trainers = [o for o in by_kind(objects, "ServiceAccount") if o["metadata"]["name"] == "kubetune-trainer"]
    assert [t["metadata"]["namespace"] for t in trainers] == ["team-a", "team-b"]
    assert all(t["automountServiceAccountToken"] is False for t in trainers)
    bound = {s["name"] for b in by_kind(objects, "RoleBinding") for s in b["subjects"]}
    assert "kubetune-trainer" not in bound  # the run's pods get no API rights


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_rendered_rule_uses_a_wildcard(value_set):
    for role in by_kind(render(value_set), "ClusterRole") + by_kind(render(value_set), "Role"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in (rule.get(key) or []), (role["metadata"]["name"], rule)


def test_a_mistyped_value_is_refused_naming_it():
    proc = run([helm(), "template", "kt", CHART, "--set", "replicas=2",
                "--set", "defaults.mlflowUri=http://x"])
    assert proc.returncode != 0
    assert "additional properties 'replicas' not allowed" in proc.stderr
    assert "mlflowUri" in proc.stderr
    proc = run([helm(), "template", "kt", CHART, "--set", "logLevel=verbose"])
    assert proc.returncode != 0 and "logLevel" in proc.stderr, proc.stderr


def test_kube_version_is_enforced():
    assert run([helm(), "template", "kt", CHART, "--kube-version", "1.30.0-eks-1"]).returncode == 0
    proc = run([helm(), "template", "kt", CHART, "--kube-version", "1.29.9"])
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr and ">=1.30.0-0" in proc.stderr, proc.stderr


def test_notes_tell_the_next_commands():
    proc = run([helm(), "install", "kt", CHART, "-n", "kubetune-system", "--dry-run=client"])
    assert proc.returncode == 0, proc.stderr
    assert "rollout status deploy/kt-kubetune" in proc.stdout
    assert "kubectl get trainingruns" in proc.stdout


def test_grafana_dashboard_queries_are_valid_promql(tmp_path):
    """Each panel query, as promtool checks a rule's expression."""
    dashboard = json.loads((REPO / "grafana" / "kubetune-dashboard.json").read_text())
    exprs = [t["expr"].replace("$namespace", ".*") for p in dashboard["panels"] for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"kubetune:panel_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump(rules))
    from .tools import promtool
    proc = run([promtool(), "check", "rules", tmp_path / "panels.yaml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_rules_unit_tests():
    from .tools import promtool
    proc = run([promtool(), "test", "rules", "kubetune-rules_test.yaml"], cwd=REPO / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_argocd_health_script_with_argocd_interpreter():
    """health.lua under gopher-lua, with only the libraries argocd-cm scripts get."""
    for flags in ([], ["-open-libs"]):
        proc = run([go_tool("luahealth"), *flags, REPO / "argocd" / "resource_customizations"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "12 passed, 0 failed" in proc.stdout, proc.stdout


def test_argocd_health_of_objects_the_current_operator_code_writes(tmp_path):
    """health_test.yaml's verdicts hold for TrainingRuns that today's `decide` writes."""
    source = REPO / "argocd" / "resource_customizations" / "kubetune.dev" / "TrainingRun"
    folder = tmp_path / "kubetune.dev" / "TrainingRun"
    folder.mkdir(parents=True)
    for name in ("health.lua", "health_test.yaml"):
        (folder / name).write_text((source / name).read_text())
    proc = run([sys.executable, REPO / "tools" / "argocd_testdata.py", "--out", folder / "testdata"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (folder / "testdata").iterdir()) == \
        sorted(p.name for p in (source / "testdata").iterdir())
    proc = run([go_tool("luahealth"), tmp_path])
    assert proc.returncode == 0 and "12 passed, 0 failed" in proc.stdout, proc.stdout


def test_argocd_health_runner_fails_a_wrong_expectation(tmp_path):
    folder = tmp_path / "kubetune.dev" / "TrainingRun"
    source = REPO / "argocd" / "resource_customizations" / "kubetune.dev" / "TrainingRun"
    (folder / "testdata").mkdir(parents=True)
    (folder / "health.lua").write_text((source / "health.lua").read_text())
    (folder / "testdata" / "succeeded.yaml").write_text((source / "testdata" / "succeeded.yaml").read_text())
    (folder / "health_test.yaml").write_text(yaml.safe_dump({"tests": [
        {"healthStatus": {"status": "Degraded", "message": "x"}, "inputPath": "testdata/succeeded.yaml"}]}))
    proc = run([go_tool("luahealth"), tmp_path])
    assert proc.returncode == 1 and "0 passed, 1 failed" in proc.stdout, proc.stdout


def test_values_schema_is_valid_json_schema():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def test_argocd_docs_manifests_parse_and_match_the_kubernetes_schemas():
    """The argocd-cm health snippet is health.lua itself, and the Applications parse."""
    docs = list(yaml.safe_load_all((REPO / "argocd" / "argocd-cm.yaml").read_text()))
    cm = docs[0]
    health = (REPO / "argocd" / "resource_customizations" / "kubetune.dev" / "TrainingRun" / "health.lua").read_text()
    assert cm["data"]["resource.customizations.health.kubetune.dev_TrainingRun"] == health
    proc = kubeconform(yaml.safe_dump(cm))
    assert proc.returncode == 0, proc.stdout
    for name in ("application-chart.yaml", "application-runs.yaml"):
        app = yaml.safe_load((REPO / "argocd" / name).read_text())
        assert app["kind"] == "Application" and app["spec"]["destination"]

