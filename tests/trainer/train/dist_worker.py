"""Run by torchrun in test_distributed.py: the real `train` step, as a pod's torchrun runs it."""

from __future__ import annotations

import sys

import torch

from kubetune_trainer.config import load_config
from kubetune_trainer.storage import staged
from kubetune_trainer.train import run_train

if __name__ == "__main__":
    torch.set_num_threads(1)
    with staged("train", load_config(sys.argv[1])) as config:  # as the CLI: a no-op on a PVC
        run_train(config)
