"""Fixtures of the finalize tests: real Composer checkpoints of the tiny model, a real MLflow server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.mlflow_server import mlflow_server  # noqa: F401  (a fixture, used by name)

from .helpers import make_config


@pytest.fixture(scope="session")
def composer_checkpoints(tiny_model_dir, tmp_path_factory) -> Path:
    """A real Composer run over the tiny model, as the train step saves it: two checkpoints
    `ep0-ba{1,2}-rank0.pt` and `latest-rank0.pt` -> the second, with the HF metadata inside."""
    import torch
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("composer") / "checkpoints"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = torch.randint(0, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(0))
    batches = torch.utils.data.DataLoader([{"input_ids": row, "labels": row} for row in tokens],
                                          batch_size=4)
    trainer = Trainer(
        model=HuggingFaceModel(model, tokenizer=tokenizer), train_dataloader=batches,
        max_duration="2ba", device="cpu", progress_bar=False, log_to_console=False, loggers=[],
        # A large step, so every tensor moves visibly away from its initial value.
        optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
        save_folder=str(folder), save_filename="ep{epoch}-ba{batch}-rank{rank}.pt", save_interval="1ba",
    )
    trainer.fit()
    trainer.close()
    return folder


@pytest.fixture
def work_dir(tmp_path, composer_checkpoints) -> Path:
    """A run's storage root whose checkpoints/ holds the trained checkpoints (a copy: tests edit it)."""
    work = tmp_path / "work"
    shutil.copytree(composer_checkpoints, work / "checkpoints", symlinks=True)
    return work


@pytest.fixture(scope="session")
def converted_hf(composer_checkpoints, tiny_model_dir, tmp_path_factory) -> Path:
    """The Hugging Face folder converted once from the trained checkpoints, for register tests."""
    from kubetune_trainer.convert import run_convert

    work = tmp_path_factory.mktemp("converted") / "work"
    shutil.copytree(composer_checkpoints, work / "checkpoints", symlinks=True)
    return Path(run_convert(make_config(work, tiny_model_dir))["hfFolder"])
