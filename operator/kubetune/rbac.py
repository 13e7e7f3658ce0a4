"""The operator's permissions, in one place: an allow-list with the verbs actually used.

The Helm chart renders `build_rbac` output and the e2e tests apply the same objects, so what is
tested is what ships. Why each rule exists:

- trainingruns: kopf watches (list, watch), patches finalizers and its progress annotations
  (patch); the shell reads one run (get) and deletes it when `ttlSecondsAfterFinished` expires.
- trainingruns/status: the plan's status patch (kopf patches the status subresource).
- trainingruns/finalizers: children carry `blockOwnerDeletion: true`, which the
  OwnerReferencesPermissionEnforcement admission plugin allows only to who may update this.
- jobs, services, configmaps: the children; never updated (the config map is immutable, Jobs are
  replaced per attempt), deleted with a propagation policy so the garbage collector takes the pods.
- pods: read-only, for exit codes, termination messages and the rank-0 IP to scrape.
- events: kopf's own events (core API) and the plan's mirrored events (either API group).
- leases, in the operator's namespace only: `kubetune.leader` elects one active replica
  (read, create when absent, replace to renew).
- the CRD/namespace observation kopf does when watching cluster-wide; kopf's own peering objects
  only when peering is used instead of the Lease (`peering=True`).

`user_rules` are for people, not the operator: the chart aggregates them into the built-in
`view` (read runs) and `edit`/`admin` (also create, change, delete them) ClusterRoles, so whoever
may edit a namespace may run training there. Status stays the operator's (read-only to users).
"""

from __future__ import annotations

from typing import Any

from .api import GROUP, PLURAL

READ = ["get", "list", "watch"]
CHILD = ["create", "delete", "get", "list", "watch"]
PEERING_VERBS = ["get", "list", "patch", "watch"]
LEASE_VERBS = ["create", "get", "update"]


def _rule(group: str, resources: list[str], verbs: list[str]) -> dict[str, Any]:
    return {"apiGroups": [group], "resources": sorted(resources), "verbs": sorted(verbs)}


def workload_rules() -> list[dict[str, Any]]:
    """What reconciling TrainingRuns needs in every namespace it handles."""
    return [
        _rule(GROUP, [PLURAL], ["delete", "get", "list", "patch", "watch"]),
        _rule(GROUP, [f"{PLURAL}/status"], ["patch"]),
        _rule(GROUP, [f"{PLURAL}/finalizers"], ["update"]),
        _rule("batch", ["jobs"], CHILD),
        _rule("", ["configmaps", "services"], CHILD),
        _rule("", ["pods"], READ),
        _rule("", ["events"], ["create", "patch"]),
        _rule("events.k8s.io", ["events"], ["create", "patch"]),
    ]


def framework_cluster_rules(peering: bool) -> list[dict[str, Any]]:
    """kopf's cluster-wide needs: seeing namespaces and CRDs come and go, cluster peering."""
    rules = [_rule("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"]),
             _rule("", ["namespaces"], ["list", "watch"])]
    if peering:
        rules.append(_rule("kopf.dev", ["clusterkopfpeerings"], PEERING_VERBS))
    return rules


def leader_election_rules() -> list[dict[str, Any]]:
    return [_rule("coordination.k8s.io", ["leases"], LEASE_VERBS)]


def user_rules() -> dict[str, list[dict[str, Any]]]:
    """Rules aggregated into the built-in roles: `view` reads runs, `edit` (and `admin`) manage
    them. Each is whole on its own, so neither depends on how the other aggregates."""
    def read() -> dict[str, Any]:
        return _rule(GROUP, [PLURAL, f"{PLURAL}/status"], READ)
    manage = _rule(GROUP, [PLURAL], ["create", "delete", "deletecollection", "patch", "update"])
    return {"view": [read()], "edit": [read(), manage]}


def operator_rules(*, cluster_wide: bool = True, peering: bool = False) -> list[dict[str, Any]]:
    """Every rule of the operator's role: a ClusterRole's when cluster-wide, else a Role's."""
    if cluster_wide:
        return [*framework_cluster_rules(peering), *workload_rules()]
    namespaced_peering = [_rule("kopf.dev", ["kopfpeerings"], PEERING_VERBS)] if peering else []
    return [*namespaced_peering, *workload_rules()]


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "operator"}


def _metadata(name: str, namespace: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {**metadata, "labels": _labels()}


def _binding(kind: str, name: str, account: dict[str, Any],
             role_namespace: str | None) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": f"{kind}Binding",
        "metadata": _metadata(name, role_namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                      "namespace": account["metadata"]["namespace"]}],
    }


def _role(kind: str, name: str, rules: list[dict[str, Any]],
          role_namespace: str | None) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind,
            "metadata": _metadata(name, role_namespace), "rules": rules}


def build_rbac(namespace: str, *, name: str = "kubetune-operator",
               watch_namespaces: list[str] | None = None, peering: bool = False,
               leader_election: bool = True) -> list[dict[str, Any]]:
    """ServiceAccount + (Cluster)Role + binding(s) for the operator running in `namespace`.

    `watch_namespaces=None` means cluster-wide (ClusterRole); a list gives one Role and
    RoleBinding per namespace, the operator then needing nothing cluster-scoped. The Lease
    rules are always a Role in the operator's own namespace.
    """
    account = {"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": _metadata(name, namespace),
               "automountServiceAccountToken": True}  # the operator itself talks to the API
    objects: list[dict[str, Any]] = [account]
    if watch_namespaces is None:
        rules = operator_rules(cluster_wide=True, peering=peering)
        objects += [_role("ClusterRole", name, rules, None),
                    _binding("ClusterRole", name, account, None)]
    else:
        rules = operator_rules(cluster_wide=False, peering=peering)
        for watched in watch_namespaces:
            objects += [_role("Role", name, rules, watched),
                        _binding("Role", name, account, watched)]
    if leader_election:
        leader = f"{name}-leader-election"
        objects += [_role("Role", leader, leader_election_rules(), namespace),
                    _binding("Role", leader, account, namespace)]
    return objects
