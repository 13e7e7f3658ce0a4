"""Peak memory of data preparation at 1x, 4x and 16x the rows: flat means bounded by a chunk.

`prepare` (run_prepare) runs in a fresh process on seeded instruction rows (a JSONL file) and
on seeded pre-training documents (a folder of .txt files); the peak resident memory of its
whole process tree (the prepare process and its workers; PSS, sampled every 50 ms with psutil) is
recorded at each size. The base size (4,000 rows, 8 chunks) already uses the worker processes,
so the sizes differ in data only. Figure: peak at 16x over peak at 1x (1.0 is flat).

    .venv/bin/python bench/data_memory.py [--rows 4000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_common import qwen_model_dir, write_cpt, write_ift  # noqa: E402

SEED = 5
CHILD = """
import sys
from kubetune_trainer.config import RunConfig
from kubetune_trainer.data import run_prepare
task, data, model, work = sys.argv[1:]
config = RunConfig(run_name="bench", run_uid="bench", model=model, task_type=task, train_data_path=data,
                   work_dir=work, context_length=2048, experiment_path="/bench", register_to="main.bench.m")
print(run_prepare(config)["dataStats"]["tokens"])
"""


def tree_rss(process: psutil.Process) -> int:
    """Proportional set size summed over the tree: forked workers share the parent's pages
    (copy on write), which plain RSS would count once per process."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def peak_rss(task: str, data: Path, model: Path, work: Path) -> tuple[int, int, float]:
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, task, str(data), str(model), str(work)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_rss(watched))
        time.sleep(0.05)
    out, err = child.communicate()
    if child.returncode:
        sys.exit(f"prepare failed:\n{err[-3000:]}")
    return peak, int(out.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    args = parser.parse_args()
    model = qwen_model_dir()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch:
        for task, writer, name in (("INSTRUCTION_FINETUNE", write_ift, "ift.jsonl"),
                                   ("CONTINUED_PRETRAIN", write_cpt, "cpt")):
            peaks = []
            for scale in (1, 4, 16):
                data = writer(Path(scratch) / f"{scale}-{name}", args.rows * scale, SEED)
                peak, tokens, seconds = peak_rss(task, data, model, Path(scratch) / f"work-{task}-{scale}")
                peaks.append(peak)
                print(f"{task} {scale:>2}x: {args.rows * scale:>7} rows, {tokens:>11,} tokens, "
                      f"peak PSS {peak / 2**20:7.0f} MiB, {seconds:.0f}s")
            figures[task] = peaks[-1] / peaks[0]
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("figure: peak PSS at 16x / 1x the rows: "
          + ", ".join(f"{task} {ratio:.2f}" for task, ratio in figures.items()))


if __name__ == "__main__":
    main()
