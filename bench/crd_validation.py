"""What the TrainingRun CRD's validation costs the API server on every status write.

The operator's most frequent write is a merge patch of a run's `/status`; the API server then
validates the whole object against the CRD's schema and runs its CEL rules (20, spec and
metadata included: a status write is judged on the whole object). On the local control plane of
the e2e tests (real etcd on tmpfs, real kube-apiserver), one after another with nothing else
running, the same status patches go to runs of three CRDs with the same schema: as shipped,
without its CEL rules, and with no validation at all (`x-kubernetes-preserve-unknown-fields`).
The run is the fullest valid spec of `tests/unit/crd_cases/valid.yaml` with the status an
operator writes there. The variants take turns, `--rounds` times; each round makes fresh runs,
then patches each in turn. Measured: each patch's latency at the client and the API server's CPU
time over the patches (`/proc/PID/stat`), what a loaded server runs short of. Figure: the API
server's CPU a status patch, as shipped over no validation.

    .venv/bin/python bench/crd_validation.py [--runs 20] [--patches 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.cluster import binaries  # noqa: E402
from tests.cluster.controlplane import ControlPlane  # noqa: E402

CRD = ROOT / "crds" / "trainingruns.kubetune.dev.yaml"
CASES = ROOT / "tests" / "unit" / "crd_cases" / "valid.yaml"
SHM = Path("/dev/shm")
NAMESPACE = "default"


def without_cel(node):
    if isinstance(node, dict):
        return {key: without_cel(value) for key, value in node.items() if key != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [without_cel(value) for value in node]
    return node


def unvalidated(_: dict) -> dict:
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
            "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                           "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}


def variants(crd: dict) -> dict[str, dict]:
    """The shipped CRD and two copies under groups of their own, one schema changed each."""
    made = {"shipped": crd}
    for name, change in (("no CEL", without_cel), ("no validation", unvalidated)):
        copied = copy.deepcopy(crd)
        group = f"{name.replace(' ', '')}.{crd['spec']['group']}".lower()
        copied["spec"]["group"] = group
        copied["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
        for version in copied["spec"]["versions"]:
            version["schema"]["openAPIV3Schema"] = change(version["schema"]["openAPIV3Schema"])
        made[name] = copied
    return made


def sample_run() -> tuple[dict, dict]:
    """The fullest valid spec, and the status the operator writes in the cases."""
    cases = {case["name"]: case for case in yaml.safe_load(CASES.read_text())}
    return cases["every field set"]["spec"], cases["with a status written by the operator"]["status"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_patches(api, crd: dict, spec: dict, status: dict, prefix: str, runs: int, patches: int,
                   server_pid: int) -> tuple[list[float], float]:
    """Each status patch's latency, and the API server's CPU seconds over all of them (the runs
    are created before)."""
    group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
    version = crd["spec"]["versions"][0]["name"]
    names = [f"{prefix}-{number}" for number in range(runs)]
    for name in names:
        api.create_namespaced_custom_object(group, version, NAMESPACE, plural, {
            "apiVersion": f"{group}/{version}", "kind": crd["spec"]["names"]["kind"],
            "metadata": {"name": name}, "spec": spec})
    times = []
    cpu = cpu_seconds(server_pid)
    for patch in range(patches):
        for name in names:
            body = copy.deepcopy(status)
            body["progress"]["percent"] = float(patch)  # a real change each time
            started = time.perf_counter()
            api.patch_namespaced_custom_object_status(group, version, NAMESPACE, plural, name, {"status": body})
            times.append(time.perf_counter() - started)
    return times, cpu_seconds(server_pid) - cpu


def apply_crds(cp: ControlPlane, crds: dict[str, dict], folder: Path) -> None:
    kubectl = binaries.tools_dir() / "kubectl"
    for number, crd in enumerate(crds.values()):
        path = folder / f"crd-{number}.yaml"
        path.write_text(yaml.safe_dump(crd))
        subprocess.run([kubectl, "--kubeconfig", cp.kubeconfig, "apply", "--server-side", "-f", path],
                       check=True, capture_output=True)
        subprocess.run([kubectl, "--kubeconfig", cp.kubeconfig, "wait", "--for=condition=Established",
                        f"crd/{crd['metadata']['name']}", "--timeout=60s"], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20, help="runs per variant and round")
    parser.add_argument("--patches", type=int, default=15, help="status patches per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from kubernetes import client, config

    crds = variants(yaml.safe_load(CRD.read_text()))
    spec, status = sample_run()
    state = Path(tempfile.mkdtemp(prefix="kubetune-bench-crd-", dir=SHM if SHM.is_dir() else None))
    cp = ControlPlane(binaries.control_plane_bin_dir(), state).start()
    try:
        apply_crds(cp, crds, state)
        api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(cp.kubeconfig)))
        server = cp.components["kube-apiserver"].proc.pid
        times: dict[str, list[float]] = {name: [] for name in crds}
        cpu = dict.fromkeys(crds, 0.0)
        for round_ in range(args.rounds):
            for name, crd in crds.items():
                latencies, seconds = status_patches(api, crd, spec, status, f"r{round_}", args.runs,
                                                    args.patches, server)
                times[name] += latencies
                cpu[name] += seconds
    finally:
        cp.stop()
    p50 = {name: statistics.median(values) for name, values in times.items()}
    per_patch = {name: cpu[name] / len(times[name]) for name in crds}
    for name, values in times.items():
        print(f"{name:>13}: status patch p50 {p50[name] * 1e3:.2f} ms, "
              f"mean {statistics.mean(values) * 1e3:.2f} ms; "
              f"API server CPU {per_patch[name] * 1e3:.2f} ms a patch ({len(values)} patches)")
    print(f"CEL rules: {per_patch['shipped'] / per_patch['no CEL']:.2f}x the API server's CPU a status patch "
          f"without them, {p50['shipped'] / p50['no CEL']:.2f}x the p50 latency")
    print(f"status patch, shipped CRD / no validation: "
          f"API server CPU {per_patch['shipped'] / per_patch['no validation']:.2f}x, "
          f"p50 latency {p50['shipped'] / p50['no validation']:.2f}x")


if __name__ == "__main__":
    main()
