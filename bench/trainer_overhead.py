"""Trainer overhead: optimizer steps/s of kubetune's `train` step against a bare PyTorch loop.

Both train the same random-weight Llama-style model on the same packed rows (block-diagonal
masks, SDPA), with the same optimizer (DecoupledLionW), schedule (linear warmup and decay),
batch and threads, on CPU, in one process, alternating. The kubetune side is the real step
(`run_train`: Composer, progress reporting, MLflow logging, checkpoints); its steps are timed
between batch WARMUP and the last batch, so start-up and the final checkpoint are left out, as
they are in the bare loop. Figure: kubetune steps/s ÷ bare steps/s, the best round of each
(goal >= 0.9); the median of the per-round ratios is printed beside it.

    .venv/bin/python bench/trainer_overhead.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from composer.core import Callback

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_inputs import model_folder, packed_rows, prepared_work_dir, run_config  # noqa: E402

SEED = 7
CONTEXT = 128
BATCH = 8
WARMUP = 3  # steps before the clock starts (allocator, first-call costs)
STEPS = 10  # timed steps
ROUNDS = 4  # each side runs this many times, alternating; the best round counts
THREADS = 2


class StepClock(Callback):
    """Wall time from the end of batch WARMUP to the end of the last batch."""

    def __init__(self):
        self.start = self.end = 0.0

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == WARMUP:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def kubetune_steps_per_second(work: Path, model: Path) -> float:
    from kubetune_trainer.train import run_train

    config = run_config(work, model, global_batch_size=BATCH, training_duration=f"{WARMUP + STEPS}ba",
                        save_interval="1000ba", seed=SEED)
    clock = StepClock()
    run_train(config, callbacks=[clock])
    return STEPS / (clock.end - clock.start)


def bare_steps_per_second(work: Path, model_dir: Path) -> float:
    from torch.utils.data import DataLoader, RandomSampler
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.train.dataset import PackedCollator, PackedDataset, open_prepared
    from kubetune_trainer.train.lion import DecoupledLionW
    from kubetune_trainer.train.trainer import BETAS

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", torch_dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    dataset = PackedDataset(open_prepared(str(work / "data"), "train"))
    loader = DataLoader(dataset, batch_size=BATCH, drop_last=True, collate_fn=PackedCollator(block_mask=True),
                        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(SEED)))
    optimizer = DecoupledLionW(model.parameters(), lr=1e-4, betas=BETAS, weight_decay=0.0)
    total = WARMUP + STEPS
    warm = max(1, round(0.02 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step / warm if step < warm else max(0.0, (total - step) / (total - warm)))
    start = 0.0
    batches = iter(loader)
    for step in range(1, total + 1):
        batch = next(batches)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == WARMUP:
            start = time.perf_counter()
    return STEPS / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    rounds = parser.parse_args().rounds
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        model = model_folder(root / "model", hidden=256, layers=4, heads=4, kv_heads=2, seed=SEED)
        rows = packed_rows(BATCH * (WARMUP + STEPS), CONTEXT, seed=SEED)
        bare, kubetune = [], []
        for round_ in range(rounds):
            work = prepared_work_dir(root / f"work{round_}", rows)
            bare.append(bare_steps_per_second(work, model))
            kubetune.append(kubetune_steps_per_second(work, model))
            print(f"round {round_}: bare {bare[-1]:.4f} steps/s, kubetune {kubetune[-1]:.4f} steps/s, "
                  f"ratio {kubetune[-1] / bare[-1]:.3f}", flush=True)
    per_round = statistics.median(ours / theirs for ours, theirs in zip(kubetune, bare))
    print(f"load average {os.getloadavg()[0]:.1f}; median of the per-round ratios {per_round:.3f}")
    print(f"trainer overhead: kubetune {max(kubetune):.2f} steps/s vs bare loop {max(bare):.2f} steps/s "
          f"(batch {BATCH}x{CONTEXT}, {THREADS} threads): ratio {max(kubetune) / max(bare):.3f}")


if __name__ == "__main__":
    main()
