"""The operator's RBAC: an allow-list with the verbs it uses, tested for what it refuses too."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from kubetune import rbac


def allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    """RBAC's own matching: a rule grants when group, resource and verb all match."""
    return any(
        (group in rule["apiGroups"] or "*" in rule["apiGroups"])
        and (resource in rule["resources"] or "*" in rule["resources"])
        and (verb in rule["verbs"] or "*" in rule["verbs"])
        for rule in rules
    )


CLUSTER = rbac.operator_rules(cluster_wide=True)
LEASES = rbac.leader_election_rules()


@pytest.mark.parametrize(("group", "resource", "verb"), [
    ("kubetune.dev", "trainingruns", "watch"),
    ("kubetune.dev", "trainingruns", "patch"),
    ("kubetune.dev", "trainingruns", "delete"),  # ttlSecondsAfterFinished
    ("kubetune.dev", "trainingruns/status", "patch"),
    ("kubetune.dev", "trainingruns/finalizers", "update"),  # blockOwnerDeletion
    ("batch", "jobs", "create"),
    ("batch", "jobs", "delete"),
    ("batch", "jobs", "list"),
    ("", "services", "create"),
    ("", "configmaps", "create"),
    ("", "pods", "list"),
    ("", "events", "create"),
    ("events.k8s.io", "events", "create"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
])
def test_allows_what_the_operator_does(group: str, resource: str, verb: str) -> None:
    assert allows(CLUSTER, group, resource, verb)


@pytest.mark.parametrize(("group", "resource", "verb"), [
    ("", "secrets", "get"),
    ("", "secrets", "list"),
    ("", "pods", "create"),
    ("", "pods", "delete"),
    ("", "pods/exec", "create"),
    ("", "pods/log", "get"),
    ("batch", "jobs", "update"),
    ("batch", "jobs", "patch"),
    ("", "configmaps", "update"),
    ("kubetune.dev", "trainingruns", "create"),
    ("kubetune.dev", "trainingruns", "update"),
    ("kubetune.dev", "trainingruns/status", "update"),
    ("rbac.authorization.k8s.io", "roles", "create"),
    ("coordination.k8s.io", "leases", "get"),  # only in the operator's namespace, by a Role
    ("apiextensions.k8s.io", "customresourcedefinitions", "create"),
    ("", "namespaces", "delete"),
])
def test_refuses_everything_else(group: str, resource: str, verb: str) -> None:
    assert not allows(CLUSTER, group, resource, verb)


def test_no_wildcards_and_no_secrets_anywhere() -> None:
    for objects in (rbac.build_rbac("kubetune-system"),
                    rbac.build_rbac("kubetune-system", watch_namespaces=["a", "b"], peering=True)):
        for obj in objects:
            for rule in obj.get("rules", []):
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], rule
                assert not any(r.startswith("secrets") for r in rule["resources"])
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
                assert rule["verbs"] == sorted(rule["verbs"])


def test_wildcard_detection_can_fail() -> None:
    assert allows([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], "", "secrets", "get")


def test_leases_only_in_the_operator_namespace() -> None:
    assert allows(LEASES, "coordination.k8s.io", "leases", "update")
    assert not allows(LEASES, "coordination.k8s.io", "leases", "delete")
    objects = rbac.build_rbac("kubetune-system")
    leader = [o for o in objects if o["metadata"]["name"] == "kubetune-operator-leader-election"]
    assert [o["kind"] for o in leader] == ["Role", "RoleBinding"]
    assert all(o["metadata"]["namespace"] == "kubetune-system" for o in leader)
    assert leader[1]["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune-operator",
                                      "namespace": "kubetune-system"}]


def test_cluster_wide_objects() -> None:
    objects = rbac.build_rbac("kubetune-system")
    kinds = [o["kind"] for o in objects]
    assert kinds == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    binding = objects[2]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "kubetune-operator"}
    assert binding["subjects"][0]["namespace"] == "kubetune-system"


def test_namespaced_mode_needs_nothing_cluster_scoped() -> None:
    objects = rbac.build_rbac("ops", watch_namespaces=["team-a", "team-b"], leader_election=False)
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Role", "RoleBinding", "Role",
                                            "RoleBinding"]
    assert {o["metadata"].get("namespace") for o in objects[1:]} == {"team-a", "team-b"}
    rules = objects[1]["rules"]
    assert not allows(rules, "", "namespaces", "list")
    assert not allows(rules, "apiextensions.k8s.io", "customresourcedefinitions", "list")
    assert allows(rules, "batch", "jobs", "create")


def test_peering_rules_only_when_asked() -> None:
    assert not allows(CLUSTER, "kopf.dev", "clusterkopfpeerings", "patch")
    assert allows(rbac.operator_rules(peering=True), "kopf.dev", "clusterkopfpeerings", "patch")
    namespaced = rbac.operator_rules(cluster_wide=False, peering=True)
    assert allows(namespaced, "kopf.dev", "kopfpeerings", "patch")


@pytest.mark.parametrize("obj", rbac.build_rbac("kubetune-system"),
                         ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_validates_against_kubernetes_schema(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, "1.35.0", strict=True)


def test_people_with_view_read_runs_and_people_with_edit_manage_them_but_never_their_status() -> None:
    roles = rbac.user_rules()
    assert allows(roles["view"], "kubetune.dev", "trainingruns", "watch")
    assert not allows(roles["view"], "kubetune.dev", "trainingruns", "create")
    for verb in ("create", "patch", "delete", "get"):
        assert allows(roles["edit"], "kubetune.dev", "trainingruns", verb)
    for role in roles.values():
        assert not allows(role, "kubetune.dev", "trainingruns/status", "patch")  # the operator's
        assert {g for rule in role for g in rule["apiGroups"]} == {"kubetune.dev"}
