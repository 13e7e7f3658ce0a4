"""Inputs of the trainer benchmarks, generated from a seed: a random-weight Llama-style model
folder (the tiny kit's tokenizer) and packed training rows in the prepared-data format."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

from kubetune_trainer.config import RunConfig
from kubetune_trainer.data.store import IGNORE_INDEX, PackedArrays, write_split


def model_folder(out: Path, *, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int = 512,
                 intermediate: int | None = None, context: int = 4096, seed: int = 0) -> Path:
    """A Hugging Face folder transformers loads as is; weights random from `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune_trainer.tinymodel import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden,
                         intermediate_size=intermediate or hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=context, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def packed_rows(count: int, context: int, *, seed: int, vocab: int = 500, fill: float = 0.95) -> PackedArrays:
    """`count` rows, each packed with samples of random length up to about `fill` of the row."""
    rng = np.random.default_rng(seed)
    arrays = {name: np.zeros((count, context), np.int32) for name in
              ("input_ids", "labels", "position_ids", "sequence_ids")}
    arrays["labels"][:] = IGNORE_INDEX
    arrays["input_ids"][:] = 2  # the pad id
    for row in range(count):
        start, number = 0, 0
        while start < int(context * fill):
            length = min(int(rng.integers(context // 16, context // 3)), context - start)
            number += 1
            tokens = rng.integers(10, vocab, length)
            arrays["input_ids"][row, start:start + length] = tokens
            arrays["labels"][row, start + 1:start + length] = tokens[1:]
            arrays["position_ids"][row, start:start + length] = np.arange(length)
            arrays["sequence_ids"][row, start:start + length] = number
            start += length
    return PackedArrays(**arrays)


def prepared_work_dir(work: Path, arrays: PackedArrays) -> Path:
    """A work_dir whose `data/` holds `arrays` as a finished `prepare` would leave it."""
    tokens = int((arrays.sequence_ids > 0).sum())
    meta = {"context_length": arrays.context_length, "num_sequences": len(arrays),
            "samples": int(arrays.sequence_ids.max(axis=1).sum()), "tokens": tokens, "truncated_samples": 0,
            "packing_efficiency": tokens / arrays.input_ids.size, "tokenizer": "tiny",
            "task_type": "INSTRUCTION_FINETUNE"}
    write_split(work / "data" / "train", arrays, meta)
    (work / "data" / "_SUCCESS").write_text(json.dumps({"dataStats": {}}))
    return work


def run_config(work: Path, model: Path, **overrides) -> RunConfig:
    fields = dict(run_name="bench", run_uid=uuid.uuid4().hex, model=str(model), train_data_path="unused",
                  work_dir=str(work), experiment_path="/Users/bench/bench", register_to="main.bench.model",
                  mlflow_tracking_uri=f"sqlite:///{work / 'mlflow.db'}", metrics_port=0, learning_rate=1e-4)
    return RunConfig(**{**fields, **overrides})
