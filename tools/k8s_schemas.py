"""Kubernetes JSON schemas for kubeconform, made from the API's own OpenAPI document.

    python tools/k8s_schemas.py    # prints the folder (made once per version)

The source is `api/openapi-spec/swagger.json` of the `k8s.io/kubernetes` Go module at the version
the test cluster runs (the same module the control plane is built from), so nothing is fetched
from a schema site. The layout is kubeconform's (and the kubernetes-json-schema project's):
`<folder>/v<version>-standalone-strict/<kind>-<group>-<version>.json`, each file a `$ref` into
`_definitions.json`, where every object that lists its properties refuses others (`-strict`).

The chart's optional ServiceMonitor, PodMonitor and PrometheusRule are checked against the CRDs
of the `prometheus-operator` Go module (PROMETHEUS_OPERATOR), made into schemas the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

K8S_VERSION = "v1.35.4"
MODULE = "k8s.io/kubernetes"
PROMETHEUS_OPERATOR = ("github.com/prometheus-operator/prometheus-operator", "v0.85.0")
MONITORING_CRDS = ("servicemonitors", "podmonitors", "prometheusrules")


def cache_root() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def module_dir(module: str, version: str) -> Path:
    out = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"],
                         capture_output=True, text=True, cwd=cache_root())
    if out.returncode != 0:
        raise SystemExit(f"k8s_schemas: go mod download {module}@{version} failed:\n{out.stderr}")
    return Path(json.loads(out.stdout)["Dir"])


def swagger_path() -> Path:
    return module_dir(MODULE, K8S_VERSION) / "api" / "openapi-spec" / "swagger.json"


def crd_schemas(crd: dict) -> dict[str, dict]:
    """kind file name -> strict schema of each served version of a CRD."""
    spec, out = crd["spec"], {}
    group = spec["group"].split(".")[0]
    for version in spec["versions"]:
        schema = schema_node(version["schema"]["openAPIV3Schema"])
        schema["properties"].setdefault("apiVersion", {"type": "string"})
        schema["properties"].setdefault("kind", {"type": "string"})
        schema["properties"]["metadata"] = {"$ref": "_definitions.json#/definitions/"
                                                    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
        out[f"{spec['names']['kind'].lower()}-{group}-{version['name']}.json"] = schema
    return out


def monitoring_crds() -> list[dict]:
    import yaml

    folder = module_dir(*PROMETHEUS_OPERATOR) / "example" / "prometheus-operator-crd"
    return [yaml.safe_load((folder / f"monitoring.coreos.com_{name}.yaml").read_text())
            for name in MONITORING_CRDS]


# Swagger types these as strings; the API server takes a number too (`port: 8080`, `cpu: 1`).
EITHER = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"oneOf": [{"type": "string"}, {"type": "number"}]},
}


def schema_node(node: dict) -> dict:
    """One schema, strict (objects that list properties refuse others) and with its refs
    pointed at `_definitions.json`; walks only where schemas nest, not property names."""
    node = dict(node)
    if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        node["$ref"] = "_definitions.json" + node["$ref"]
    if "properties" in node:
        node["properties"] = {name: schema_node(child) for name, child in node["properties"].items()}
        node.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = schema_node(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            node[key] = [schema_node(child) for child in node[key]]
    return node


def write_schemas(swagger: dict, folder: Path) -> None:
    definitions = {name: schema_node(schema) for name, schema in swagger["definitions"].items()}
    definitions.update(EITHER)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "_definitions.json").write_text(json.dumps({"definitions": definitions}))
    for name, schema in swagger["definitions"].items():
        for gvk in schema.get("x-kubernetes-group-version-kind") or []:
            group = gvk["group"].split(".")[0] if gvk["group"] else ""
            suffix = f"-{group}-{gvk['version']}" if group else f"-{gvk['version']}"
            kind_file = tmp / f"{gvk['kind'].lower()}{suffix}.json"
            kind_file.write_text(json.dumps({"$ref": f"_definitions.json#/definitions/{name}"}))
    for crd in monitoring_crds():
        for file_name, schema in crd_schemas(crd).items():
            (tmp / file_name).write_text(json.dumps(schema))
    tmp.rename(folder)


def schema_folder() -> Path:
    root = cache_root() / f"k8s-schemas-{K8S_VERSION}-prometheus-operator-{PROMETHEUS_OPERATOR[1]}"
    folder = root / f"{K8S_VERSION}-standalone-strict"
    if not (folder / "_definitions.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        write_schemas(json.loads(swagger_path().read_text()), folder)
    return root


if __name__ == "__main__":
    print(schema_folder())
    sys.exit(0)
