"""Fixtures of the train tests: prepared data written per the contract, and run configs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetune_trainer.config import RunConfig
from kubetune_trainer.data.store import IGNORE_INDEX, PackedArrays, write_split
from tests.support.ports import free_port

CONTEXT = 32
EXPERIMENT = "/Users/test/tiny"
# Tiny models on a few shared cores: one intra-op thread is several times faster than contending.
torch.set_num_threads(1)


def pack(samples: list[list[int]], context: int = CONTEXT, pad: int = 2) -> dict[str, np.ndarray]:
    """One packed row from whole samples, laid out as `prepare` does (contracts.md)."""
    row = {name: np.full(context, fill, np.int32) for name, fill in
           (("input_ids", pad), ("labels", IGNORE_INDEX), ("position_ids", 0), ("sequence_ids", 0))}
    start = 0
    for number, sample in enumerate(samples, 1):
        end = start + len(sample)
        row["input_ids"][start:end] = sample
        row["labels"][start + 1:end] = sample[1:]  # no loss on a sample's first token
        row["position_ids"][start:end] = np.arange(len(sample))
        row["sequence_ids"][start:end] = number
        start = end
    return row


def write_prepared(data_dir: Path, split: str, rows: list[dict[str, np.ndarray]]) -> None:
    arrays = PackedArrays(**{name: np.stack([row[name] for row in rows]) for name in rows[0]})
    tokens = int((arrays.sequence_ids > 0).sum())
    meta = {"context_length": arrays.context_length, "num_sequences": len(arrays), "samples": len(rows) * 2,
            "tokens": tokens, "truncated_samples": 0, "packing_efficiency": tokens / arrays.input_ids.size,
            "tokenizer": "tiny", "task_type": "INSTRUCTION_FINETUNE"}
    write_split(data_dir / split, arrays, meta)
    (data_dir / "_SUCCESS").write_text(json.dumps({"dataStats": {}}))


def random_rows(count: int, seed: int, vocab: int = 300) -> list[dict[str, np.ndarray]]:
    """Rows of two samples each (lengths vary), leaving some padding at the end."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        first = int(rng.integers(6, 16))
        second = int(rng.integers(6, CONTEXT - first - 2))
        rows.append(pack([list(rng.integers(10, vocab, first)), list(rng.integers(10, vocab, second))]))
    return rows


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """A sqlite store whose experiment keeps artifacts in the temp dir (the default is ./mlruns)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    return uri


def config_factory(work: Path, model: Path, mlflow_uri: str):
    """RunConfig factory over `work`, where 16 prepared train rows wait (4 batches of 4)."""
    write_prepared(work / "data", "train", random_rows(16, seed=1))

    def make(**overrides) -> RunConfig:
        fields = dict(run_name="tiny", run_uid=uuid.uuid4().hex, model=str(model), train_data_path="unused",
                      work_dir=str(work), experiment_path=EXPERIMENT, register_to="main.default.tiny",
                      mlflow_tracking_uri=mlflow_uri, global_batch_size=4, learning_rate=1e-3,
                      training_duration="1ep", save_interval="1ep", metrics_port=0)
        return RunConfig(**{**fields, **overrides})

    return make


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, mlflow_uri):
    return config_factory(tmp_path / "work", tiny_model_dir, mlflow_uri)
