"""Finalization: a Composer checkpoint -> a Hugging Face folder (`convert`), against a raw copy
of the same bytes.

The checkpoint is a real one: the kubetune trainer trains a random-weight Llama-style model
(about 55M parameters) for one batch and saves it (weights, the optimizer state, the tokenizer).
`run_convert` then reads its weights and writes `hf/` (safetensors, config, tokenizer); the
baseline copies the bytes that conversion must read and write, the written `model.safetensors`,
with `shutil.copyfile`, from the page cache as the conversion reads. Alternating rounds, the
best of each. Figure: copy time ÷ convert time (goal >= 0.5).

    .venv/bin/python bench/finalize.py
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _trainer_inputs import model_folder, packed_rows, prepared_work_dir, run_config  # noqa: E402

SEED = 11
ROUNDS = 4


def trained_checkpoint(root: Path) -> tuple[Path, object]:
    from kubetune_trainer.train import run_train

    model = model_folder(root / "model", hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000, seed=SEED)
    work = prepared_work_dir(root / "work", packed_rows(2, 64, seed=SEED))
    config = run_config(work, model, global_batch_size=2, training_duration="1ba")
    run_train(config)
    return work, config


def main() -> None:
    from kubetune_trainer.convert import run_convert

    logging.disable(logging.INFO)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        work, config = trained_checkpoint(root)
        hf = Path(config.hf_dir)
        converts, copies = [], []
        for _ in range(ROUNDS):
            shutil.rmtree(hf, ignore_errors=True)  # no marker: the step converts anew
            started = time.perf_counter()
            run_convert(config)
            converts.append(time.perf_counter() - started)
            weights = hf / "model.safetensors"
            started = time.perf_counter()
            shutil.copyfile(weights, root / "copy.safetensors")
            copies.append(time.perf_counter() - started)
            (root / "copy.safetensors").unlink()
        size = weights.stat().st_size
        print(f"checkpoint {next(Path(config.checkpoint_dir).glob('ep*')).stat().st_size / 2**20:.0f} MiB, "
              f"weights {size / 2**20:.0f} MiB; convert {min(converts):.2f}s, copy {min(copies):.2f}s")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"finalize: convert {size / min(converts) / 2**20:.0f} MiB/s vs raw copy {size / min(copies) / 2**20:.0f} "
          f"MiB/s: ratio {min(copies) / min(converts):.3f}")


if __name__ == "__main__":
    main()
