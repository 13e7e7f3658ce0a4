"""`make test` as parallel lanes: the suite split into pytest processes that run side by side.

Most of an end-to-end test's wall time is spent waiting (for a pod to start, a Job to finish, the
operator to react), so two e2e lanes, each with its own control plane, operator and MLflow server
(the session fixtures), overlap their waits with each other and with the CPU-bound unit and trainer
tests. Every test file lands in exactly one lane: `core` is everything outside tests/e2e and
tests/cluster, `e2e-b` is tests/e2e minus the files `e2e-a` names, so a new file is never missed;
`agent` runs the cluster harness tests once more on the node agent, and the e2e tests real
nodes here cannot serve (`AGENT_ONLY`).

    python -m tests.support.lanes [--jobs N] [pytest args...]

`--jobs 1` runs the lanes one after another. Each lane's output goes to build/test-lanes/<lane>.log
and is printed whole when the lane ends; the exit status is non-zero if any lane failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOGS = REPO / "build" / "test-lanes"
NO_TESTS_COLLECTED = 5   # pytest's exit status

# The slowest e2e files, balanced against the rest of tests/e2e (in lanes, CI-parity seconds:
# controls ~760, helm ~380, Kueue ~100; the other e2e files ~1,100 in all).
# The e2e tests this machine's kubelets cannot serve (each skip says why), run on the node agent.
AGENT_ONLY = [
    "tests/e2e/test_faults.py::test_storage_full_during_data_preparation_fails_the_run_clearly_and_keeps_what_was_saved",
    "tests/e2e/test_lifecycle.py::"
    "test_a_run_with_object_store_storage_keeps_its_files_in_the_bucket_and_its_secret_referenced",
]
E2E_A = ["tests/e2e/test_helm_chart.py", "tests/e2e/test_controls.py", "tests/e2e/test_kueue.py",
         "tests/cluster"]


@dataclass
class Lane:
    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)


def lanes() -> list[Lane]:
    e2e_a = [path for path in E2E_A if (REPO / path).exists()]
    return [
        Lane("e2e-a", e2e_a),
        Lane("e2e-b", ["tests/e2e", *(f"--ignore={path}" for path in e2e_a)]),
        Lane("core", ["tests", "--ignore=tests/e2e", "--ignore=tests/cluster"]),
        # The e2e lanes run on real nodes; the node agent, which the control-plane benchmark runs
        # hundreds of pods on, is held to the same harness tests, and serves the e2e tests real
        # nodes here cannot (a full filesystem under a run's folder, a run stored on S3).
        Lane("agent", ["tests/cluster/test_harness.py", *AGENT_ONLY], {"KUBETUNE_E2E_NODE": "agent"}),
    ]


def start(lane: Lane, pytest_args: list[str]) -> tuple[subprocess.Popen, Path]:
    log = LOGS / f"{lane.name}.log"
    basetemp = LOGS / "tmp" / lane.name   # one per lane: pytest wipes its own basetemp at start
    basetemp.parent.mkdir(parents=True, exist_ok=True)   # pytest makes only the last folder
    argv = [sys.executable, "-m", "pytest", f"--basetemp={basetemp}", *pytest_args, *lane.args]
    # Many torch processes side by side on few cores: one thread each, or their thread pools
    # spin against each other (the node agent passes this on to the pods it runs).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **lane.env}
    out = log.open("w")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)   # its own group: Ctrl-C stops all it started
    out.close()
    return proc, log


def summary_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "no output"


def run(all_lanes: list[Lane], pytest_args: list[str], jobs: int) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    waiting, running, failed = list(all_lanes), {}, []
    began = time.monotonic()
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                lane = waiting.pop(0)
                running[lane.name] = (*start(lane, pytest_args), time.monotonic())
                print(f"lane {lane.name}: started ({' '.join(lane.args)})", flush=True)
            for name, (proc, log, since) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                print(f"\n{'=' * 30} lane {name}: exit {proc.returncode} after "
                      f"{time.monotonic() - since:.0f}s {'=' * 30}", flush=True)
                sys.stdout.write(log.read_text(errors="replace"))
                sys.stdout.flush()
                if proc.returncode not in (0, NO_TESTS_COLLECTED):   # a -k may leave a lane empty
                    failed.append(f"{name} ({summary_line(log)})")
            time.sleep(1)
    except KeyboardInterrupt:
        for proc, _, _ in running.values():
            os.killpg(proc.pid, signal.SIGINT)
        raise
    print(f"\nall lanes done in {time.monotonic() - began:.0f}s"
          + (f"; FAILED: {'; '.join(failed)}" if failed else "; all passed"), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("KUBETUNE_TEST_JOBS", "3")),
                        help="lanes run at once (default 3, or $KUBETUNE_TEST_JOBS)")
    known, pytest_args = parser.parse_known_args(argv)
    return run(lanes(), pytest_args, max(1, known.jobs))


if __name__ == "__main__":
    sys.exit(main())
