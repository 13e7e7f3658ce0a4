"""What a kubelet computes for a container, for the two stand-ins that run pods as processes:
local mode (`kubetune run --local`) and the tests' node agent (tests/cluster).

The container's environment as the kubelet builds it (envFrom, env in order, `$(VAR)`
expansion, fieldRef values of the downward API), its termination message (the result file,
else the log's tail under `FallbackToLogsOnError`) and its exit code as a runtime reports it.
Pods are plain dicts in the API's JSON shape (camelCase).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Callable

# (kind, namespace, name) -> the object as JSON, or None when absent.
Lookup = Callable[[str, str, str], "dict | None"]

TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LIMIT = 2048


class ContainerConfigError(Exception):
    """A reference the pod needs is missing (kubelet: CreateContainerConfigError)."""


# -- references: fieldRef, ConfigMap and Secret keys ---------------------------------------
_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref(pod: dict, path: str) -> str:
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"), "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return simple[path] or ""
    m = _SUBSCRIPT.match(path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):   # downwardAPI volume files only
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    raise ContainerConfigError(f"unsupported fieldRef {path!r}")


def object_data(obj: dict) -> dict[str, bytes]:
    """Key -> bytes of a ConfigMap (data + binaryData) or a Secret (data, base64)."""
    if obj.get("kind") == "Secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def _referenced(kind: str, ns: str, ref: dict, lookup: Lookup) -> dict[str, bytes] | None:
    obj = lookup(kind, ns, ref["name"])
    if obj is None:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(f'{kind.lower()} "{ref["name"]}" not found')
    return object_data(obj)


def _key_ref(kind: str, ns: str, ref: dict, lookup: Lookup) -> str | None:
    data = _referenced(kind, ns, ref, lookup)
    if data is None:
        return None
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ContainerConfigError(f'couldn\'t find key {ref["key"]} in {kind} {ns}/{ref["name"]}')
    return data[ref["key"]].decode()


# -- environment ----------------------------------------------------------------------------
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` escapes a `$`."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(sub, text)


def resolve_env(container: dict, pod: dict, lookup: Lookup,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment, as the kubelet builds it: base (service variables),
    then envFrom, then env in order, each `value` expanded against what came before."""
    ns = pod["metadata"]["namespace"]
    env = dict(base or {})
    for src in container.get("envFrom") or []:
        kind, ref = (("ConfigMap", src["configMapRef"]) if "configMapRef" in src
                     else ("Secret", src["secretRef"]))
        data = _referenced(kind, ns, ref, lookup) or {}
        env.update({src.get("prefix", "") + k: v.decode() for k, v in data.items()})
    for var in container.get("env") or []:
        value = _env_value(var, pod, lookup, env)
        if value is not None:
            env[var["name"]] = value
    return env


def _env_value(var: dict, pod: dict, lookup: Lookup, env: dict[str, str]) -> str | None:
    if "valueFrom" not in var:
        return expand(var.get("value", ""), env)
    src, ns = var["valueFrom"], pod["metadata"]["namespace"]
    if "fieldRef" in src:
        return field_ref(pod, src["fieldRef"]["fieldPath"])
    if "secretKeyRef" in src:
        return _key_ref("Secret", ns, src["secretKeyRef"], lookup)
    if "configMapKeyRef" in src:
        return _key_ref("ConfigMap", ns, src["configMapKeyRef"], lookup)
    raise ContainerConfigError(f"unsupported valueFrom in env {var['name']}: {sorted(src)}")


def command_line(container: dict, env: dict[str, str]) -> list[str]:
    """command + args with `$(VAR)` expanded from the container's environment."""
    return [expand(arg, env) for arg in [*(container.get("command") or []), *(container.get("args") or [])]]


# -- when the container has ended ------------------------------------------------------------
def tail_bytes(path: Path, limit: int) -> bytes:
    """The last `limit` bytes of a log file (nothing when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read()
    except FileNotFoundError:
        return b""


def termination_message(file_text: bytes, log_tail: bytes, exit_code: int, policy: str) -> str:
    message = file_text[:TERMINATION_MESSAGE_LIMIT]
    if not message and exit_code != 0 and policy == "FallbackToLogsOnError":
        message = log_tail[-FALLBACK_LOG_LIMIT:]
    return message.decode(errors="replace")


def exit_code_of(returncode: int) -> int:
    """Popen's -N (killed by signal N) becomes 128+N, as container runtimes report it."""
    return 128 - returncode if returncode < 0 else returncode
