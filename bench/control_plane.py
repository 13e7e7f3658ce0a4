"""The control plane at scale: N TrainingRuns created at once against the real API server.

The local cluster of the e2e tests (kube-apiserver, kube-controller-manager and etcd built from
their Go modules, the node agent of tests/cluster running pods as processes) and the operator as a
process (`kubetune operator`, leader election on). Every step is a no-op shell command that writes
the result document its step must write: data prep and finalize exit at once, each training pod
blocks on a FIFO until the benchmark releases it, so all N runs sit in Training together.

Figures, in one run:
- creation → training pods created: from the create call of a run to its training pod's ADDED
  event (data prep ran and finished in between), p50 / p95 / max, and the same per stage
  (operator: create → prep Job, prep pod's exit seen → training Job; the Job controller: Job →
  pod; the node agent: prep pod → its exit reported);
- API requests per second at steady state: `apiserver_request_total` (the API server's own
  counter, every client) read before and after a window while every run trains, with the
  biggest resource/verb pairs;
- the operator's peak RSS (VmHWM of its process), and its resident memory by kind of mapping
  with every run training and at the end; with `--trace-memory`, where its Python objects were
  allocated (tracemalloc in the operator, which slows it: latencies of such a run do not count);
- a training pod's exit → the run's status showing it (condition Trained), p50 / p95: pods are
  released at a steady rate, each writing the time it exits; beside it the node agent's and the
  operator's shares, and over the same span the operator's own histograms (reconcile wait,
  reconcile, status patch round trip), its CPU seconds and its reconciles per run.

    make bench-control-plane RUNS=200   (or: .venv/bin/python bench/control_plane.py --runs 200
                                          [--window 60] [--release-rate 20] [--create-rate 20]
                                          [--kcm-qps 20] [--trace-memory] [--driver floor])

The baseline, `--driver floor`: the same bench with bench/floor_driver.py in the operator's
place, the least any controller must do for these runs' children (no validation, no Events,
one status write a stage). Its latencies are what this machine's cluster alone takes; the
operator's over them is the operator's overhead.

`--create-rate` paces the creations (default: all at once, 8 client threads). `--kcm-qps` is the
kube-controller-manager's client QPS (its default, 20 a controller, lets the Job controller
write ~20 times a second: one run's two Jobs cost it about 10 writes, so a burst of runs waits
on it; clusters this size run it higher).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from hashlib import sha256
from pathlib import Path

import yaml
from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `make bench` runs it as a script

from kubetune.api import GROUP, PLURAL, VERSION  # noqa: E402
from tests.cluster import binaries  # noqa: E402
from tests.cluster.controlplane import ControlPlane  # noqa: E402
from tests.cluster.node_agent import NodeAgent  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune")) / "bench"
CRD = REPO / "crds" / "trainingruns.kubetune.dev.yaml"
NAMESPACE = "bench"
SHM = Path("/dev/shm")
RESULTS = {
    "prepare": {"ok": True, "step": "prepare", "dataStats": {
        "samples": 1, "tokens": 8, "truncatedSamples": 0, "sequences": 1, "packingEfficiency": 1.0}},
    "train": {"ok": True, "step": "train"},
    "finalize": {"ok": True, "step": "finalize", "registeredModel": {
        "name": "main.bench.model", "version": "1", "artifactUri": "file:///bench/hf"}},
}


def step_script(fifos: Path) -> str:
    """`sh -c SCRIPT step <step> --config FILE`: write the step's result; train waits first."""
    def write(step: str) -> str:
        return f"printf '%s' '{json.dumps(RESULTS[step])}' > \"$KUBETUNE_TERMINATION_LOG\""
    return (f'case "$1" in\n'
            f'  prepare) {write("prepare")} ;;\n'
            f'  train) read _ < "{fifos}/$HOSTNAME"; date +%s.%N > "{fifos}/$HOSTNAME.exited"; '
            f'{write("train")} ;;\n'
            f'  finalize) {write("finalize")} ;;\n'
            f'esac\n')


def run_manifest(name: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"model": "/bench/model", "trainDataPath": "/bench/train.jsonl",
                     "registerTo": "main.bench", "validateInputs": False}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def request_counts(cp: ControlPlane) -> dict[tuple[str, str], float]:
    """apiserver_request_total summed by (resource, verb); WATCH requests count when they open."""
    status, body = cp.api_get("/metrics")
    assert status == 200, status
    counts: dict[tuple[str, str], float] = {}
    for line in body.decode().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
        key = (labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else ""),
               labels.get("verb", ""))
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def api_time_by_kind(metrics_text: str, top: int = 8) -> list[tuple[str, float, float]]:
    """The API server's time in requests (every client, since it started), by verb and resource:
    (kind, seconds in all, ms a request), the `top` kinds with the most seconds. Watches are
    left out (they last as long as they are open)."""
    seconds: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        for suffix, into in (("_sum{", seconds), ("_count{", counts)):
            if line.startswith(f"apiserver_request_duration_seconds{suffix}"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
                if labels.get("verb") in ("WATCH", "CONNECT"):
                    continue
                kind = f"{labels.get('verb')} {labels.get('resource') or labels.get('path', '')}" + (
                    f"/{labels['subresource']}" if labels.get("subresource") else "")
                into[kind] = into.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
    ranked = sorted(seconds.items(), key=lambda item: -item[1])[:top]
    return [(kind, round(total, 1), round(1000 * total / max(counts.get(kind, 1.0), 1.0), 1)) for kind, total in ranked]


class Watcher:
    """Times, as this process sees them, of each run's training pod appearing and of its
    status first showing Trained."""

    def __init__(self, api_client: client.ApiClient):
        self.api_client = api_client
        self.jobs_added: dict[str, dict[str, float]] = {"prep": {}, "train": {}}
        self.pod_added: dict[str, float] = {}
        self.pod_running: set[str] = set()
        self.prep_added: dict[str, float] = {}
        self.prep_done: dict[str, float] = {}
        self.train_done: dict[str, float] = {}  # the node agent reported the pod Succeeded
        self.trained: dict[str, float] = {}
        self.succeeded: set[str] = set()
        self.stop = threading.Event()

    def start(self) -> Watcher:
        for target in (self._pods, self._runs, self._jobs):
            threading.Thread(target=target, daemon=True).start()
        return self

    def _stream(self, call, handle) -> None:
        while not self.stop.is_set():
            try:
                response = call(watch=True, _preload_content=False, timeout_seconds=300,
                                _request_timeout=(10, 330))
                for line in iter_resp_lines(response):
                    event = json.loads(line)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        handle(event["object"], time.monotonic())
            except Exception:  # noqa: BLE001 - a benchmark's watch: just watch again
                time.sleep(0.5)

    def _pods(self) -> None:
        core = client.CoreV1Api(self.api_client)
        self._stream(lambda **kw: core.list_namespaced_pod(
            NAMESPACE, label_selector="kubetune.dev/component in (prep,train)", **kw), self._pod)

    def _pod(self, pod: dict, now: float) -> None:
        labels, phase = pod["metadata"]["labels"], (pod.get("status") or {}).get("phase")
        run = labels["kubetune.dev/run"]
        if labels["kubetune.dev/component"] == "prep":
            self.prep_added.setdefault(run, now)
            if phase == "Succeeded":
                self.prep_done.setdefault(run, now)
            return
        self.pod_added.setdefault(run, now)
        if phase == "Running":
            self.pod_running.add(run)
        elif phase == "Succeeded":
            self.train_done.setdefault(run, now)

    def _jobs(self) -> None:
        batch = client.BatchV1Api(self.api_client)
        self._stream(lambda **kw: batch.list_namespaced_job(
            NAMESPACE, label_selector="kubetune.dev/component in (prep,train)", **kw), self._job)

    def _job(self, job: dict, now: float) -> None:
        labels = job["metadata"]["labels"]
        self.jobs_added[labels["kubetune.dev/component"]].setdefault(labels["kubetune.dev/run"], now)

    def _runs(self) -> None:
        custom = client.CustomObjectsApi(self.api_client)
        self._stream(lambda **kw: custom.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, **kw), self._run)

    def _run(self, run: dict, now: float) -> None:
        status, name = run.get("status") or {}, run["metadata"]["name"]
        if any(c.get("type") == "Trained" and c.get("status") == "True" for c in status.get("conditions") or []):
            self.trained.setdefault(name, now)
        if status.get("phase") == "Succeeded":
            self.succeeded.add(name)


def between(earlier: dict[str, float], later: dict[str, float]) -> list[float]:
    """later - earlier for each run the watches saw both times of (a watch that was cut and
    listed again misses what happened meanwhile to objects already gone)."""
    return [later[n] - earlier[n] for n in earlier if n in later]


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"runs": 0}
    return {"runs": len(values), "p50": round(statistics.median(values), 2),
            "p95": round(percentile(values, 95), 2), "max": round(max(values), 2)}


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_cpu() -> tuple[int, int]:
    """(busy, all) CPU ticks of the whole machine since boot, every core (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How much of the machine's CPU was busy between two readings (1.0: every core, always)."""
    return round((after[0] - before[0]) / max(after[1] - before[1], 1), 2)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def gc_watches_runs(cp: ControlPlane, timeout: float) -> bool:
    """Whether the garbage collector began watching TrainingRuns within `timeout` (its reflector
    lists by watching); the bench goes on either way and reports which."""
    say("waiting for the garbage collector to watch TrainingRuns")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(request_counts(cp).get(("trainingruns", verb)) for verb in ("LIST", "WATCH")):
            return True
        time.sleep(2)
    say(f"the garbage collector did not watch TrainingRuns within {timeout:.0f}s; going on")
    return False


def wait_until(predicate, timeout: float, what: str) -> None:
    say(f"waiting for {what}")
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(cp: ControlPlane, operator: subprocess.Popen) -> dict[str, float]:
    """CPU seconds of each process of the bench (this one: the node agent and the watches)."""
    pids = {name: comp.proc.pid for name, comp in cp.components.items() if comp.proc is not None}
    pids |= {"operator": operator.pid, "bench + node agent": os.getpid()}
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def memory_mb(pid: int) -> dict[str, float | int]:
    """A process's resident memory by kind of mapping (/proc/PID/smaps): glibc's main heap, its
    other arenas (64 MiB-aligned), thread stacks (8 MiB), other anonymous memory (Python's
    object arenas, large blocks malloc maps alone), files (code, libraries)."""
    kinds = dict.fromkeys(("heap", "malloc arenas", "thread stacks", "other anonymous", "files"), 0.0)
    kind = "files"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            if path == "[heap]":
                kind = "heap"
            elif path == "[stack]" or (not path and end - start in (8 << 20, (8 << 20) - 4096)):
                kind = "thread stacks"
            elif not path and start % (64 << 20) == 0:
                kind = "malloc arenas"
            else:
                kind = "other anonymous" if not path else "files"
        elif fields[0] == "Rss:":
            kinds[kind] += int(fields[1]) / 1024
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss": round(int(status["VmRSS"].split()[0]) / 1024, 1), "threads": int(status["Threads"]),
            **{k: round(v, 1) for k, v in kinds.items()}}


def histogram(metrics_text: str, name: str, **match: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative buckets (its series whose labels match `match`, a
    regex per label, summed): upper bound -> count."""
    summed: dict[float, float] = {}
    for labels, value in re.findall(rf"^{name}_bucket{{([^}}]*)}} (\S+)$", metrics_text, re.MULTILINE):
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if all(re.fullmatch(pattern, named.get(label, "")) for label, pattern in match.items()):
            summed[float(named["le"])] = summed.get(float(named["le"]), 0.0) + float(value)
    return summed


def histogram_quantiles(metrics_text: str, name: str, since: str = "", **match: str) -> dict[str, float | str]:
    """p50 and p95 of a Prometheus histogram as the upper bound of their bucket, and the count;
    given `since` (the same metrics read earlier), of what was observed after that."""
    earlier = histogram(since, name, **match)
    summed = {le: n - earlier.get(le, 0.0) for le, n in histogram(metrics_text, name, **match).items()}
    buckets = sorted(summed.items())
    count = buckets[-1][1] if buckets else 0.0
    out: dict[str, float | str] = {"count": count}
    for q in (50, 95):
        bound = next((le for le, cumulative in buckets if cumulative >= q / 100 * count), float("inf"))
        out[f"p{q}"] = f"<= {bound:g}"
    return out


def operator_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        return response.read().decode()


# `--trace-memory`: the operator under tracemalloc, writing a snapshot when sent SIGUSR1.
# Traced from after the imports (~100 MB that do not grow with the runs; importing the client
# under tracemalloc takes minutes).
TRACED_OPERATOR = """
import signal, sys, tracemalloc
from kubetune.cli import main
import kubetune.k8s.main
tracemalloc.start(10)
signal.signal(signal.SIGUSR1, lambda *_: tracemalloc.take_snapshot().dump(sys.argv[1]))
sys.exit(main(["operator"]))
"""
OWN_CODE = ("/kubetune/", "/kubetune_trainer/", "/kopf/", "/kubernetes/", "/aiohttp/", "/prometheus_client/")


def memory_by_origin(snapshot: Path, top: int = 15) -> list[tuple[str, float]]:
    """MB still allocated, by the innermost frame in the operator's code or its libraries (a
    JSON decoder's allocation counts where the JSON was read)."""
    import tracemalloc

    by_site: dict[str, float] = {}
    for trace in tracemalloc.Snapshot.load(str(snapshot)).traces:
        frame = next((f for f in reversed(trace.traceback) if any(part in f.filename for part in OWN_CODE)),
                     trace.traceback[-1])  # frames run from the oldest to the newest
        site = f"{frame.filename.split('site-packages/')[-1].split('/operator/')[-1]}:{frame.lineno}"
        by_site[site] = by_site.get(site, 0.0) + trace.size / 2**20
    return [(site, round(mb, 1)) for site, mb in sorted(by_site.items(), key=lambda kv: -kv[1])[:top]]


def operator_python() -> str:
    """A Python holding the operator image's packages and no others: pyproject's dependencies
    under constraints.txt, as operator/Dockerfile installs them; made once per their hash. The
    development venv holds optional packages the `kubernetes` client imports when present
    (google-auth, kubernetes-validate), ~12 MB of resident memory the shipped operator lacks."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    constraints = REPO / "constraints.txt"
    key = sha256(json.dumps([dependencies, constraints.read_text(), sys.version]).encode()).hexdigest()[:12]
    venv = CACHE / f"operator-venv-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        say(f"making the operator image's Python environment in {venv} (once)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *dependencies], check=True)
        (venv / ".installed").touch()
    return str(python)


def start_operator(kubeconfig: Path, work: Path, fifos: Path, metrics_port: int,
                   traced: Path | None = None, driver: str = "operator") -> subprocess.Popen:
    """The operator (or, `driver="floor"`, the baseline in bench/floor_driver.py, on the same
    Python and settings)."""
    # The source tree's code on the image's packages (the image installs that code).
    source = os.pathsep.join(str(REPO / part) for part in ("operator", "trainer-image"))
    env = {**os.environ, "PYTHONPATH": source, "KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": "default",
           "KUBETUNE_TRAINER_COMMAND": json.dumps(["sh", "-c", step_script(fifos), "step"]),
           "KUBETUNE_STORAGE_URI": str(work / "storage"), "KUBETUNE_STORAGE_CLAIM_NAME": "",
           "KUBETUNE_OPERATOR_METRICS_PORT": str(metrics_port), "KUBETUNE_LOG_LEVEL": "WARNING",
           "PYTHONUNBUFFERED": "1"}
    log = open(work / "operator.log", "ab")  # noqa: SIM115 - lives as long as the process
    command = ["-c", TRACED_OPERATOR, str(traced)] if traced else ["-m", "kubetune.cli", "operator"]
    if driver == "floor":
        command = [str(REPO / "bench" / "floor_driver.py"), NAMESPACE]
    return subprocess.Popen([operator_python(), *command], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def release(runs: list[str], fifos: Path, rate: float) -> None:
    """Let each run's training pod exit, `rate` pods a second."""
    for name in runs:
        fifo = fifos / f"{name}-train-1-0"
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the pod reads it
                break
            except OSError:
                time.sleep(0.05)
        os.write(fd, b"go\n")
        os.close(fd)
        time.sleep(1 / rate)


def create_all(custom: client.CustomObjectsApi, names: list[str], rate: float) -> dict[str, float]:
    """Create the runs, all at once (8 client threads) or `rate` a second; name -> when created."""
    created: dict[str, float] = {}
    start = time.monotonic()

    def create(index_name: tuple[int, str]) -> None:
        index, name = index_name
        if rate:
            time.sleep(max(0.0, start + index / rate - time.monotonic()))
        custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, run_manifest(name))
        created[name] = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(create, enumerate(names)))
    return created


def kcm_flags(qps: float) -> tuple[str, ...]:
    if not qps:
        return ()
    return (f"--kube-api-qps={qps:g}", f"--kube-api-burst={2 * qps:g}", "--concurrent-job-syncs=50")


def traced_memory(operator: subprocess.Popen, snapshot: Path) -> list[tuple[str, float]]:
    operator.send_signal(signal.SIGUSR1)
    wait_until(lambda: snapshot.exists() and snapshot.stat().st_size > 0, 120, "the operator's tracemalloc snapshot")
    time.sleep(2)  # dump() may still be writing
    found = memory_by_origin(snapshot)
    say(f"the operator's traced memory, MB by where it was allocated: {found}")
    return found


def measure(runs: int, window: float, rate: float, work: Path, create_rate: float = 0.0,
            kcm_qps: float = 0.0, trace_memory: bool = False, driver: str = "operator") -> dict:
    fifos = work / "fifos"
    fifos.mkdir(parents=True)
    names = [f"bench-{i:04d}" for i in range(runs)]
    for name in names:
        os.mkfifo(fifos / f"{name}-train-1-0")
    say("starting the control plane and the node agent")
    # etcd's data in memory where there is a tmpfs: what is measured is the operator, not this
    # machine's shared disk (an fsync here takes ~4 ms, more when others write; etcd fsyncs
    # every commit).
    state = Path(tempfile.mkdtemp(prefix="kubetune-bench-cp-", dir=SHM)) if SHM.is_dir() else work / "control-plane"
    cp = ControlPlane(binaries.control_plane_bin_dir(), state,
                      kcm_args=kcm_flags(kcm_qps)).start()
    agent = operator = None
    try:
        agent = NodeAgent(cp.kubeconfig, work / "node").start()
        kubectl = binaries.tools_dir() / "kubectl"
        subprocess.run([kubectl, "--kubeconfig", cp.kubeconfig, "apply", "--server-side", "-f", CRD],
                       check=True, capture_output=True)
        subprocess.run([kubectl, "--kubeconfig", cp.kubeconfig, "wait", "--for=condition=Established",
                        "crd/trainingruns.kubetune.dev", "--timeout=60s"], check=True, capture_output=True)
        # As on a cluster where the chart installed the CRD long before: the garbage collector
        # watches TrainingRuns (its discovery finds a new resource within ~30 s). A run's
        # children made before then name an owner it has not seen, which it looks up with a
        # GET, again and again with backoff until its watch shows the run.
        gc_watching = gc_watches_runs(cp, 180)
        subprocess.run([kubectl, "--kubeconfig", cp.kubeconfig, "create", "namespace", NAMESPACE],
                       check=True, capture_output=True)
        api_client = config.new_client_from_config(config_file=str(cp.kubeconfig))
        watcher = Watcher(api_client).start()
        metrics_port = free_port()
        snapshot = work / "operator.tracemalloc" if trace_memory else None
        operator = start_operator(cp.kubeconfig, work, fifos, metrics_port, snapshot, driver)

        def own_metrics() -> str:  # the floor driver has none
            return operator_metrics(metrics_port) if driver == "operator" else ""
        time.sleep(5)  # the operator elects itself and lists what there is
        load_before, counts_at_start = load_average(), request_counts(cp)
        cpu_at_start, machine_at_start = cpu_by_process(cp, operator), machine_cpu()
        say(f"creating {runs} TrainingRuns" + (f", {create_rate:g}/s" if create_rate else " at once"))
        created = create_all(client.CustomObjectsApi(api_client), names, create_rate)
        creating_s = max(created.values()) - min(created.values())
        wait_until(lambda: len(watcher.pod_running) == runs, 300 + 5 * runs, "every training pod running")
        machine_busy = {"creation -> every training pod running": busy_share(machine_at_start, machine_cpu())}
        to_workers = [watcher.pod_added[n] - created[n] for n in names]
        jobs = watcher.jobs_added
        stages = {"operator: create->prep Job": between(created, jobs["prep"]),
                  "job controller: prep Job->pod": between(jobs["prep"], watcher.prep_added),
                  "node agent: prep pod->its exit reported": between(watcher.prep_added, watcher.prep_done),
                  "operator: prep exit seen->training Job": between(watcher.prep_done, jobs["train"]),
                  "job controller: training Job->pod": between(jobs["train"], watcher.pod_added)}

        say(f"counting API requests for {window:.0f}s of steady state")
        time.sleep(10)  # what the start-up left settles
        before, started = request_counts(cp), time.monotonic()
        time.sleep(window)
        after, elapsed = request_counts(cp), time.monotonic() - started
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        busiest = sorted(((v / elapsed, k) for k, v in delta.items() if v > 0), reverse=True)[:6]

        memory_training = memory_mb(operator.pid)
        traced = traced_memory(operator, snapshot) if snapshot else None
        say(f"releasing the training pods, {rate:.0f}/s")
        own_before, operator_cpu_before, released = (own_metrics(), cpu_seconds(operator.pid),
                                                     time.monotonic())
        machine_at_release = machine_cpu()
        release(names, fifos, rate)
        wait_until(lambda: len(watcher.trained) == runs, 300 + 5 * runs, "every run Trained")
        own_trained, operator_cpu_trained = own_metrics(), cpu_seconds(operator.pid)
        machine_busy["first release -> every run Trained"] = busy_share(machine_at_release, machine_cpu())
        exit_phase = {  # from the first release to the last Trained: where the operator's share went
            "wall_s": round(time.monotonic() - released, 1),
            "operator_cpu_s": round(operator_cpu_trained - operator_cpu_before, 1),
            **{figure: histogram_quantiles(own_trained, metric, since=own_before) for figure, metric in (
                ("reconcile_wait_s", "kubetune_reconcile_wait_seconds"),
                ("reconcile_s", "kubetune_reconcile_duration_seconds"),
                ("status_patch_s", "kubetune_status_patch_seconds"))}}
        wait_until(lambda: len(watcher.succeeded) == runs, 300 + 5 * runs, "every run Succeeded")
        wall = time.time() - time.monotonic()  # the watcher's times are monotonic, `date`'s wall
        exited = {name: float((fifos / f"{name}-train-1-0.exited").read_text()) - wall for name in names}
        exit_to_status = [watcher.trained[n] - exited[n] for n in names]
        agent_share = between(exited, watcher.train_done)
        operator_share = between(watcher.train_done, watcher.trained)
        rss = peak_rss_mb(operator.pid)
        cpu = {name: round(seconds - cpu_at_start[name], 1) for name, seconds in cpu_by_process(cp, operator).items()}
        counts_at_end = request_counts(cp)
        api_metrics = cp.api_get("/metrics")[1].decode()
        whole = {k: v - counts_at_start.get(k, 0.0) for k, v in counts_at_end.items()}
        per_run = sorted(((v / runs, k) for k, v in whole.items() if v / runs >= 0.5), reverse=True)
        own = own_metrics()
        watcher.stop.set()
        return {"driver": driver, "runs": runs, "create_rate": create_rate or "at once", "creating_s": round(creating_s, 2),
                "gc_watched_runs_before_creation": gc_watching,
                "kcm_qps": kcm_qps or "default (20)", "etcd_data": "tmpfs" if state.parent == SHM else "disk", "load_average_at_creation": load_before,
                "load_average_at_end": load_average(),
                "to_workers_p50": statistics.median(to_workers), "to_workers_p95": percentile(to_workers, 95),
                "to_workers_max": max(to_workers),
                # The first create call to the last training pod: the whole burst's span, which
                # the order the runs happen to be created in does not move.
                "first_create_to_last_training_pod_s": round(
                    max(watcher.pod_added[n] for n in names) - min(created.values()), 2),
                "to_workers_stages": {k: spread(v) for k, v in stages.items()},
                "requests_per_s": sum(delta.values()) / elapsed, "window_s": elapsed,
                "busiest": [(f"{verb} {resource}", round(per_s, 2)) for per_s, (resource, verb) in busiest],
                # Every client's requests from the first creation to the last run Succeeded.
                "requests_per_run": round(sum(whole.values()) / runs, 1),
                "requests_per_run_busiest": [(f"{verb} {resource}", round(n, 1)) for n, (resource, verb) in per_run],
                "exit_to_status_p50": statistics.median(exit_to_status),
                "exit_to_status_p95": percentile(exit_to_status, 95),
                "exit_to_status_max": max(exit_to_status),
                # The node agent's share: the process's exit to its pod's Succeeded reaching the API.
                "exit_to_reported": spread(agent_share),
                # The operator's share: from the pod's Succeeded reaching the API to status Trained.
                "reported_to_status": spread(operator_share),
                # The operator's own histograms over the same span (every tick, not only the
                # ones an exit woke; bucket bounds), its CPU seconds, and ticks per run.
                "exit_phase": {**exit_phase, "ticks_per_run": round(
                    exit_phase["reconcile_s"]["count"] / runs, 1)},
                "operator_peak_rss_mb": rss,
                # Resident memory by kind, with every run training, and at the end.
                "operator_memory_mb": {"training": memory_training, "end": memory_mb(operator.pid)},
                **({"operator_traced_mb_training": traced} if traced else {}),
                # CPU seconds each process spent from the first creation to the last Succeeded
                # (the machine had 2 cores; the pods' own processes are not counted).
                "cpu_s": {**cpu, "wall": round(time.monotonic() - min(created.values()), 1)},
                # The whole machine's CPU use over the two timed phases: near 1.0, every core was
                # busy, and a stage's latency is its share of a saturated machine, not a wait.
                "machine_busy": machine_busy,
                # The API server's own time for writes, every client, since it started.
                "api_write_latency_s": histogram_quantiles(api_metrics, "apiserver_request_duration_seconds",
                                                           verb="POST|PUT|PATCH|DELETE"),
                # Where the API server's time went: (kind, seconds in all, ms a request).
                "api_time_by_kind": api_time_by_kind(api_metrics),
                # The operator's own view, every reconcile of the whole bench (bucket bounds).
                "operator_reconcile_wait_s": histogram_quantiles(own, "kubetune_reconcile_wait_seconds"),
                "operator_reconcile_s": histogram_quantiles(own, "kubetune_reconcile_duration_seconds")}
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
        if agent is not None:
            agent.stop()
        cp.stop()
        shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of steady state counted")
    parser.add_argument("--release-rate", type=float, default=20.0, help="training pods let exit per second")
    parser.add_argument("--create-rate", type=float, default=0.0, help="runs created per second (0: at once)")
    parser.add_argument("--kcm-qps", type=float, default=0.0,
                        help="kube-controller-manager client QPS (0: its default, 20)")
    parser.add_argument("--driver", choices=("operator", "floor"), default="operator",
                        help="floor: instead of the operator, the least any controller must do for the "
                             "same children (bench/floor_driver.py), the baseline of the latencies")
    parser.add_argument("--trace-memory", action="store_true",
                        help="run the operator under tracemalloc and report where its memory is, every run "
                             "training (slower: its latencies are not comparable)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on the way out
    # Not under /tmp: the node agent maps a pod's /tmp mount onto its own folder.
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="control-plane-", dir=CACHE))
    try:
        figures = measure(args.runs, args.window, args.release_rate, work, args.create_rate, args.kcm_qps,
                          args.trace_memory, args.driver)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(yaml.safe_dump(figures, sort_keys=False))
    print(f"control plane ({figures['driver']}), {figures['runs']} runs: creation->training pods p50 {figures['to_workers_p50']:.2f}s "
          f"p95 {figures['to_workers_p95']:.2f}s (target <= 2s); steady state "
          f"{figures['requests_per_s']:.2f} API requests/s (target <= 5); exit->status "
          f"p50 {figures['exit_to_status_p50']:.2f}s p95 {figures['exit_to_status_p95']:.2f}s (target <= 1s); "
          f"operator peak RSS {figures['operator_peak_rss_mb']:.0f} MB (target <= 250)")


if __name__ == "__main__":
    main()
