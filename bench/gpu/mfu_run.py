"""The two halves of bench/gpu_mfu.sh: `prepare WORK` (one process: the model folder and the
packed rows) and `train WORK` (every GPU, under torchrun: kubetune's `train` step, measured)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from _trainer_inputs import model_folder, packed_rows, prepared_work_dir, run_config  # noqa: E402

SEED = 5
CONTEXT = 2048
PER_GPU_BATCH = 8
WARMUP = 10  # batches: compilation of the attention kernel, the allocator, auto-microbatching
MEASURED = 30
# TinyLlama-1.1B's shape: 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads, 32k vocabulary.
MODEL = dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000, context=CONTEXT)


def prepare(work: Path, gpus: int) -> None:
    model_folder(work / "model", seed=SEED, **MODEL)
    rows = packed_rows(gpus * PER_GPU_BATCH * (WARMUP + MEASURED), CONTEXT, seed=SEED)
    prepared_work_dir(work / "run", rows)
    print(f"prepared {work}: model and {len(rows)} rows of {CONTEXT} tokens")


def train(work: Path, gpus: int) -> None:
    import torch
    from composer.core import Callback
    from composer.utils import dist

    from kubetune_trainer.config import Distributed
    from kubetune_trainer.train import run_train
    from kubetune_trainer.train.runtime import flash_attention_installed

    config = run_config(work / "run", work / "model", global_batch_size=gpus * PER_GPU_BATCH,
                        training_duration=f"{WARMUP + MEASURED}ba", save_interval="100000ba",
                        distributed=Distributed(procs_per_node=gpus, gpus_per_node=gpus, fsdp=True))

    class Meter(Callback):
        """Rank 0: the trainer's own report (progress.json) after each measured batch."""

        def __init__(self):
            self.reports: list[dict] = []

        def batch_end(self, state, logger):
            if dist.get_global_rank() == 0 and int(state.timestamp.batch) > WARMUP:
                self.reports.append(json.loads(Path(config.progress_file).read_text()))

    meter = Meter()
    run_train(config, callbacks=[meter])
    peak_memory = torch.cuda.max_memory_allocated() / 2**30
    if dist.get_global_rank() != 0:
        return
    tokens = statistics.median(r["tokensPerSecond"] for r in meter.reports)
    mfu = [r["mfu"] for r in meter.reports if r["mfu"] is not None]
    kernel = "flash_attention_2" if flash_attention_installed() else "flex_attention"
    print(f"{torch.cuda.get_device_name()} x{gpus}, bf16, FSDP, {kernel}, sequence {CONTEXT}, "
          f"batch {PER_GPU_BATCH}/GPU: {tokens:,.0f} tokens/s ({tokens / gpus:,.0f} per GPU), "
          f"peak memory {peak_memory:.1f} GiB on rank 0")
    print(f"gpu mfu: {statistics.median(mfu):.3f}" if mfu else
          "gpu mfu: unknown (this GPU is not in kubetune_trainer/train/flops.py's peak table)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", choices=["prepare", "train"])
    parser.add_argument("work", type=Path)
    parser.add_argument("--gpus", type=int, required=True)
    args = parser.parse_args()
    (prepare if args.step == "prepare" else train)(args.work, args.gpus)


if __name__ == "__main__":
    main()
