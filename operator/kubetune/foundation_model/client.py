"""The SDK's only I/O: TrainingRuns through the Kubernetes API, with the user's own credentials.

`connect()` reads the current kubeconfig context (KUBECONFIG or ~/.kube/config) and its
namespace, as kubectl does, or the pod's ServiceAccount when there is no kubeconfig. Every API
error leaves this module as one of `errors.py`'s types, with a message that says what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.config.incluster_config import InClusterConfigLoader
from kubernetes.client.exceptions import ApiException

from ..api import GROUP, PLURAL, VERSION
from .errors import (
    CrdNotInstalledError,
    FoundationModelError,
    InvalidArgumentsError,
    NoClusterError,
    PermissionDeniedError,
    RunNotFoundError,
)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
REQUEST_TIMEOUT = (10, 60)  # seconds: connect, read
WATCH_SECONDS = 300  # the server ends a watch after this; it is then resumed where it was
USER_VERBS = "get, list, watch, create, patch and delete"


@dataclass(frozen=True)
class Target:
    """Where calls go: the API server, as a person would name it, and the default namespace."""

    server: str
    namespace: str
    source: str  # "context NAME of KUBECONFIG" or "in-cluster ServiceAccount"


def connect(namespace: str | None = None, *, group: str = GROUP, version: str = VERSION) -> Runs:
    """A client for the current kubeconfig context (or in-cluster); NoClusterError if neither."""
    configuration = client.Configuration()
    # Read now, not when the kubernetes package was imported: KUBECONFIG may be a list of files.
    kubeconfig = os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        config.load_kube_config(kubeconfig, client_configuration=configuration, persist_config=False)
        _, active = config.list_kube_config_contexts(kubeconfig)
        default_namespace = active.get("context", {}).get("namespace") or "default"
        source = f"kubeconfig context {active.get('name')!r}"
    except (config.ConfigException, FileNotFoundError, OSError) as kubeconfig_error:
        account = service_account_dir()
        try:
            InClusterConfigLoader(token_filename=str(account / "token"),
                                  cert_filename=str(account / "ca.crt")).load_and_set(configuration)
        except config.ConfigException:
            raise NoClusterError(
                f"no Kubernetes cluster configured ({kubeconfig_error}): point KUBECONFIG at a kubeconfig"
                " file (or create ~/.kube/config, e.g. with your cloud's `get-credentials` command), or run"
                " inside a pod") from None
        default_namespace = _pod_namespace(account)
        source = "in-cluster ServiceAccount"
    configuration.retries = urllib3.Retry(total=2, connect=2, read=0, status=0, backoff_factor=0.2)
    target = Target(configuration.host, namespace or default_namespace, source)
    return Runs(client.ApiClient(configuration), target, group, version)


def service_account_dir() -> Path:
    """The pod's ServiceAccount folder; KUBETUNE_SERVICE_ACCOUNT_DIR names another where a runtime
    mounts it elsewhere, as for the operator (kubetune.k8s.main)."""
    return Path(os.environ.get("KUBETUNE_SERVICE_ACCOUNT_DIR") or SERVICE_ACCOUNT_DIR)


def _pod_namespace(account: Path) -> str:
    try:
        return (account / "namespace").read_text().strip() or "default"
    except OSError:
        return "default"


class Runs:
    """TrainingRuns in the namespaces the caller's credentials reach, as plain dicts."""

    def __init__(self, api_client: client.ApiClient, target: Target, group: str = GROUP,
                 version: str = VERSION):
        self.api_client, self.target, self.group, self.version = api_client, target, group, version
        self.custom = client.CustomObjectsApi(api_client)

    @property
    def namespace(self) -> str:
        return self.target.namespace

    @property
    def resource(self) -> str:
        return f"{PLURAL}.{self.group}"

    def close(self) -> None:
        self.api_client.close()

    def __enter__(self) -> Runs:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # --- calls --------------------------------------------------------------------------------

    def get(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        namespace = namespace or self.namespace
        with self.translated("get", namespace, name):
            return self.custom.get_namespaced_custom_object(
                self.group, self.version, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT)

    def list(self, namespace: str | None = None, *, all_namespaces: bool = False,
             selector: str | None = None) -> dict[str, Any]:
        """The list object ({items, metadata.resourceVersion}) of one namespace or all of them."""
        kwargs = {"label_selector": selector or "", "_request_timeout": REQUEST_TIMEOUT}
        where = None if all_namespaces else (namespace or self.namespace)
        with self.translated("list", where):
            if where is None:
                return self.custom.list_cluster_custom_object(self.group, self.version, PLURAL, **kwargs)
            return self.custom.list_namespaced_custom_object(self.group, self.version, where, PLURAL, **kwargs)

    def create(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        meta = resource["metadata"]
        with self.translated("create", meta["namespace"], meta["name"]):
            return self.custom.create_namespaced_custom_object(
                self.group, self.version, meta["namespace"], PLURAL, dict(resource),
                _request_timeout=REQUEST_TIMEOUT)

    def annotate(self, name: str, namespace: str, annotations: Mapping[str, str]) -> dict[str, Any]:
        patch = {"metadata": {"annotations": dict(annotations)}}
        with self.translated("patch", namespace, name):
            return self.custom.patch_namespaced_custom_object(
                self.group, self.version, namespace, PLURAL, name, patch, _request_timeout=REQUEST_TIMEOUT)

    def delete(self, name: str, namespace: str) -> None:
        with self.translated("delete", namespace, name):
            self.custom.delete_namespaced_custom_object(
                self.group, self.version, namespace, PLURAL, name, propagation_policy="Background",
                _request_timeout=REQUEST_TIMEOUT)

    def whoami(self) -> str | None:
        """The authenticated user's name (a SelfSubjectReview), None where the server won't say."""
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        try:
            answer = client.AuthenticationV1Api(self.api_client).create_self_subject_review(
                review, _request_timeout=REQUEST_TIMEOUT)
        except (ApiException, urllib3.exceptions.HTTPError):
            return None
        info = answer.status.user_info if answer.status else None
        return info.username if info else None

    def watch(self, namespace: str | None = None, *, name: str | None = None, all_namespaces: bool = False,
              selector: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """("ADDED" | "MODIFIED" | "DELETED", run) as the API server reports changes, forever.

        Starts with the runs that exist now (as ADDED); a watch the server ends is resumed from
        its last resourceVersion, an expired one (410 Gone) from a fresh list."""
        where = None if all_namespaces else (namespace or self.namespace)
        fields = f"metadata.name={name}" if name else None
        while True:
            listed = self._list_for_watch(where, fields, selector)
            for item in listed.get("items") or []:
                yield "ADDED", item
            version = listed["metadata"]["resourceVersion"]
            try:
                while True:
                    version = yield from self._stream(where, fields, selector, version)
            except ApiException as error:
                if error.status != 410:  # only an expired resourceVersion is resumed by relisting
                    raise self._translate(error, "watch", where, name) from None

    def _list_for_watch(self, where: str | None, fields: str | None, selector: str | None) -> dict[str, Any]:
        kwargs = {"field_selector": fields or "", "label_selector": selector or "",
                  "_request_timeout": REQUEST_TIMEOUT}
        with self.translated("list", where):
            if where is None:
                return self.custom.list_cluster_custom_object(self.group, self.version, PLURAL, **kwargs)
            return self.custom.list_namespaced_custom_object(self.group, self.version, where, PLURAL, **kwargs)

    def _stream(self, where: str | None, fields: str | None, selector: str | None,
                version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """One watch request from `version`; returns the last resourceVersion it saw."""
        watcher = watch.Watch()
        kwargs = {"field_selector": fields or "", "label_selector": selector or "",
                  "resource_version": version, "timeout_seconds": WATCH_SECONDS,
                  "allow_watch_bookmarks": True, "_request_timeout": (REQUEST_TIMEOUT[0], WATCH_SECONDS + 30)}
        if where is None:
            stream = watcher.stream(self.custom.list_cluster_custom_object, self.group, self.version, PLURAL,
                                    **kwargs)
        else:
            stream = watcher.stream(self.custom.list_namespaced_custom_object, self.group, self.version, where,
                                    PLURAL, **kwargs)
        try:
            for event in stream:
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    yield event["type"], event["object"]
        except urllib3.exceptions.ReadTimeoutError:
            pass  # a quiet watch; resume it
        except urllib3.exceptions.HTTPError as error:
            raise self._unreachable(error) from None
        finally:
            watcher.stop()
        return watcher.resource_version or version

    # --- errors -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def translated(self, verb: str, namespace: str | None, name: str | None = None) -> Iterator[None]:
        try:
            yield
        except ApiException as error:
            raise self._translate(error, verb, namespace, name) from None
        except urllib3.exceptions.HTTPError as error:
            raise self._unreachable(error) from None

    def _unreachable(self, error: Exception) -> NoClusterError:
        reason = getattr(error, "reason", None) or error
        return NoClusterError(
            f"cannot reach the Kubernetes API server {self.target.server} ({self.target.source}): {reason};"
            " check that the cluster is up and that KUBECONFIG names the right context")

    def _translate(self, error: ApiException, verb: str, namespace: str | None,
                   name: str | None) -> FoundationModelError:
        status = _status_body(error)
        message = status.get("message") or error.reason or ""
        where = f"namespace {namespace!r}" if namespace else "all namespaces"
        if error.status == 401:
            return PermissionDeniedError(
                f"the API server {self.target.server} rejected the credentials of {self.target.source}:"
                f" {message}; log in again or refresh the kubeconfig's token")
        if error.status == 403:
            return PermissionDeniedError(
                f"{message}; ask a cluster admin for a Role (or ClusterRole, for -A) that grants"
                f" {USER_VERBS} on {self.resource} in {where}, bound to you")
        if error.status == 404 and _names_missing_run(status):
            return RunNotFoundError(
                f"TrainingRun {name!r} not found in {where}; `kubetune list -n {namespace}` shows the runs"
                " there (use -n/namespace= for another namespace)")
        if error.status == 404:
            return CrdNotInstalledError(
                f"the API server {self.target.server} does not serve {self.resource} ({self.version}):"
                " the kubetune CRD is not installed; install it with `helm install kubetune charts/kubetune`"
                " or `kubectl apply -f crds/`")
        if error.status == 409:
            return InvalidArgumentsError(f"{message}; choose another name, or delete the old run first")
        if error.status == 422 or error.status == 400:
            causes = [c.get("message", "") for c in (status.get("details") or {}).get("causes") or []]
            text = "\n  ".join(causes) if causes else message
            return InvalidArgumentsError(f"the API server refused the TrainingRun:\n  {text}")
        return FoundationModelError(
            f"the API server answered {error.status} {error.reason} to {verb} {self.resource} in {where}:"
            f" {message}; try again, and tell the cluster's admin if it persists")


def _status_body(error: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def _names_missing_run(status: Mapping[str, Any]) -> bool:
    """A 404 about one run (a Status naming it) rather than about the resource type itself."""
    details = status.get("details") or {}
    return status.get("kind") == "Status" and status.get("reason") == "NotFound" and bool(details.get("name"))
