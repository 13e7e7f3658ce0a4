"""Fixtures of the data-preparation tests: run configs, the tiny tokenizer, data locations."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer.config import RunConfig, TaskType

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "data"
BROKEN = Path(__file__).resolve().parent / "broken"


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def no_system_tokenizer(tiny_model_no_system_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_no_system_dir)


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    """RunConfig factory: the tiny model, a fresh work dir, overrides as keyword arguments."""

    def make(train, task=TaskType.INSTRUCTION_FINETUNE, **overrides) -> RunConfig:
        fields = dict(
            run_name="run", run_uid="uid-1", model=str(tiny_model_dir), task_type=task,
            train_data_path=str(train), work_dir=str(tmp_path / "work"),
            experiment_path="/Users/test/run", register_to="main.default.run",
        )
        return RunConfig(**{**fields, **overrides})

    return make
