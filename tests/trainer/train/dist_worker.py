"""Run by torchrun in test_distributed.py: the real `train` step plus a per-rank weights digest."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from composer.core import Callback
from composer.utils import dist

from kubetune_trainer.config import load_config
from kubetune_trainer.train import run_train


def digest(model: torch.nn.Module) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


class WeightsDigest(Callback):
    def __init__(self, out: Path):
        self.out = out

    def fit_start(self, state, logger):
        self.initial = digest(state.model)

    def fit_end(self, state, logger):
        rank = dist.get_global_rank()
        document = {"initial": self.initial, "final": digest(state.model),
                    "batches": int(state.timestamp.batch)}
        (self.out / f"weights-rank{rank}.json").write_text(json.dumps(document))


if __name__ == "__main__":
    torch.set_num_threads(1)
    config = load_config(sys.argv[1])
    out = Path(config.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_train(config, callbacks=[WeightsDigest(out)])
