"""Finalization: a Composer checkpoint -> a Hugging Face folder (`convert`), against a raw copy
of the same bytes.

The checkpoint is a real one: the kubetune trainer trains a random-weight Llama-style model for
one batch and saves it (weights, the optimizer state, the tokenizer), at two sizes: ~55M
parameters, where conversion's fixed costs (building the model skeleton, the tokenizer files)
weigh most, and ~240M, closer to the models people fine-tune, where the bytes dominate.
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
SIZES = {"~55M": (512, 8), "~240M": (1024, 16)}  # name -> (hidden size, layers); 32k vocabulary


def trained_checkpoint(root: Path, hidden: int, layers: int) -> tuple[Path, object]:
    from kubetune_trainer.train import run_train

    model = model_folder(root / "model", hidden=hidden, layers=layers, heads=hidden // 64, kv_heads=4,
                         vocab=32000, seed=SEED)
    work = prepared_work_dir(root / "work", packed_rows(2, 64, seed=SEED))
    config = run_config(work, model, global_batch_size=2, training_duration="1ba")
    run_train(config)
    return work, config


def measure(root: Path, hidden: int, layers: int) -> tuple[float, float, int]:
    """(best convert time, best copy time, weight bytes): alternating rounds of each."""
    from kubetune_trainer.convert import run_convert

    work, config = trained_checkpoint(root, hidden, layers)
    hf = Path(config.hf_dir)
    converts, copies = [], []
    for _ in range(ROUNDS):
        shutil.rmtree(hf, ignore_errors=True)  # no marker: the step converts anew
        os.sync()  # each side starts with no dirty pages: the kernel's writeback throttling
        started = time.perf_counter()  # otherwise slows whichever side follows the other's writes
        run_convert(config)
        converts.append(time.perf_counter() - started)
        weights = hf / "model.safetensors"
        os.sync()
        started = time.perf_counter()
        shutil.copyfile(weights, root / "copy.safetensors")
        copies.append(time.perf_counter() - started)
        (root / "copy.safetensors").unlink()
    checkpoint = next(Path(config.checkpoint_dir).glob("ep*")).stat().st_size
    size = weights.stat().st_size
    print(f"checkpoint {checkpoint / 2**20:.0f} MiB, weights {size / 2**20:.0f} MiB; "
          f"convert {min(converts):.2f}s, copy {min(copies):.2f}s")
    return min(converts), min(copies), size


def main() -> None:
    logging.disable(logging.INFO)
    torch.set_num_threads(2)
    ratios = {}
    for name, (hidden, layers) in SIZES.items():
        with tempfile.TemporaryDirectory() as temp:
            convert, copy, size = measure(Path(temp), hidden, layers)
        ratios[name] = copy / convert
        print(f"{name}: convert {size / convert / 2**20:.0f} MiB/s vs raw copy {size / copy / 2**20:.0f} MiB/s: "
              f"ratio {ratios[name]:.3f}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("finalize vs a raw copy: " + ", ".join(f"{name} ratio {ratio:.3f}" for name, ratio in ratios.items()))


if __name__ == "__main__":
    main()
