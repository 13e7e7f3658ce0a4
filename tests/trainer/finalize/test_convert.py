"""convert: real Composer checkpoints -> a Hugging Face folder that plain `transformers` uses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .helpers import load_and_generate, make_config

HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


def checkpoint_weights(path: Path) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)["state"]["model"]
    return {key.removeprefix("model."): tensor for key, tensor in state.items()}


def test_converts_latest_checkpoint_to_a_folder_transformers_loads(work_dir, tiny_model_dir):
    from safetensors.torch import load_file

    from kubetune_trainer.convert import run_convert

    result = run_convert(make_config(work_dir, tiny_model_dir))

    hf = Path(result["hfFolder"])
    assert hf == work_dir / "hf"
    assert HF_FILES <= {path.name for path in hf.iterdir()}
    assert not list(hf.glob("*.bin")), "weights must be safetensors, never pickles"
    converted = load_file(hf / "model.safetensors")
    trained = checkpoint_weights(work_dir / "checkpoints" / "ep0-ba2-rank0.pt")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert converted.keys() == trained.keys() == initial.keys()
    for key, tensor in converted.items():
        assert tensor.equal(trained[key]), f"{key} differs from the checkpoint"
        assert not tensor.equal(initial[key]), f"{key} still holds the initial weights"

    loaded = load_and_generate(hf)
    assert loaded["kubetune_imported"] is False
    assert loaded["new_tokens"] == 5
    assert loaded["text"].startswith("<s><|user|>\nhello model<|end|>\n<|assistant|>\n")
    base_generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert loaded["eos_token_id"] == base_generation["eos_token_id"]


def test_without_latest_pointer_the_highest_epoch_and_batch_wins(work_dir, tiny_model_dir):
    from kubetune_trainer.convert import find_checkpoint, read_marker, run_convert

    checkpoints = work_dir / "checkpoints"
    (checkpoints / "latest-rank0.pt").unlink()
    # Batch 10 sorts before batch 2 as text; rank 1 files and stray names are never picked.
    os.replace(checkpoints / "ep0-ba2-rank0.pt", checkpoints / "ep0-ba10-rank0.pt")
    (checkpoints / "ep0-ba99-rank1.pt").write_bytes(b"")
    (checkpoints / "ep0-ba98").mkdir()  # a folder without .metadata is no sharded checkpoint
    assert find_checkpoint(checkpoints) == checkpoints / "ep0-ba10-rank0.pt"

    run_convert(make_config(work_dir, tiny_model_dir))
    assert read_marker(work_dir / "hf")["checkpoint"] == str(checkpoints / "ep0-ba10-rank0.pt")


def test_a_complete_folder_for_the_same_checkpoint_is_kept(work_dir, tiny_model_dir):
    from kubetune_trainer.convert import run_convert

    config = make_config(work_dir, tiny_model_dir)
    hf = Path(run_convert(config)["hfFolder"])
    weights = hf / "model.safetensors"
    first = weights.stat().st_ino

    run_convert(config)
    assert weights.stat().st_ino == first, "the same checkpoint must not be converted twice"

    # Training went on (a resumed attempt): the folder follows the new latest checkpoint.
    latest = work_dir / "checkpoints" / "latest-rank0.pt"
    latest.unlink()
    latest.symlink_to("ep0-ba1-rank0.pt")
    run_convert(config)
    assert weights.stat().st_ino != first
    assert json.loads((hf / ".kubetune-source.json").read_text())["checkpoint"].endswith("ep0-ba1-rank0.pt")
    assert not list(work_dir.glob(".hf.*")), "no temporary folder left behind"


def test_an_interrupted_conversion_leaves_no_folder_and_is_redone(work_dir, tiny_model_dir):
    from kubetune_trainer.convert import replace_atomically, run_convert

    def crash(out: Path) -> None:
        (out / "half").mkdir(parents=True)
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(work_dir / "hf", crash)
    assert not (work_dir / "hf").exists()

    hf = Path(run_convert(make_config(work_dir, tiny_model_dir))["hfFolder"])
    assert (hf / "model.safetensors").is_file() and not (hf / "half").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_sharded_fsdp_checkpoint_converts_to_the_same_weights(work_dir, tiny_model_dir):
    """An FSDP run saves `ep{e}-ba{b}/` of `.distcp` shards with `.metadata`; latest points there."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from kubetune_trainer.checkpoints import read_state
    from kubetune_trainer.convert import run_convert

    checkpoints = work_dir / "checkpoints"
    monolithic = checkpoints / "ep0-ba2-rank0.pt"
    trained = checkpoint_weights(monolithic)
    # The structure Composer gives torch.distributed.checkpoint: {"state": State.state_dict(), "rng"}.
    dcp.save(torch.load(monolithic, map_location="cpu", weights_only=False),
             checkpoint_id=checkpoints / "ep0-ba3")
    assert list((checkpoints / "ep0-ba3").glob("*.distcp"))
    assert set(read_state(checkpoints / "ep0-ba3")) == {"model", "integrations"}, "optimizer read"
    for path in [monolithic, checkpoints / "ep0-ba1-rank0.pt", checkpoints / "latest-rank0.pt"]:
        path.unlink()

    hf = Path(run_convert(make_config(work_dir, tiny_model_dir))["hfFolder"])

    converted = load_file(hf / "model.safetensors")
    assert converted.keys() == trained.keys()
    assert all(converted[key].equal(trained[key]) for key in converted)


def test_missing_checkpoint_is_a_user_error_naming_the_folder(tmp_path, tiny_model_dir):
    from kubetune_trainer.convert import run_convert
    from kubetune_trainer.errors import UserError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest-rank0.pt").symlink_to("ep0-ba5-rank0.pt")  # dangling
    with pytest.raises(UserError) as raised:
        run_convert(make_config(tmp_path, tiny_model_dir))
    assert raised.value.reason == "CheckpointMissing" and raised.value.permanent
    assert str(tmp_path / "checkpoints") in raised.value.message


def test_unreadable_checkpoint_is_a_user_error(work_dir, tiny_model_dir):
    from kubetune_trainer.convert import run_convert
    from kubetune_trainer.errors import UserError

    (work_dir / "checkpoints" / "ep0-ba2-rank0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as raised:
        run_convert(make_config(work_dir, tiny_model_dir))
    assert raised.value.reason == "CheckpointUnreadable"
    assert not (work_dir / "hf").exists()


def test_tied_embeddings_and_the_configs_dtype_survive_conversion(tmp_path):
    """Many small chat models tie lm_head to the embeddings; the config's dtype is honoured."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from kubetune_trainer.convert import build_model

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         torch_dtype="bfloat16")
    torch.manual_seed(1)
    trained = LlamaForCausalLM(config)  # fp32 master weights, as Composer keeps them
    weights = {f"model.{key}": tensor for key, tensor in trained.state_dict().items()}

    build_model(config.to_dict(), weights).save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype="auto")

    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    expected = trained.model.embed_tokens.weight.to(torch.bfloat16)
    assert loaded.model.embed_tokens.weight.equal(expected)


@pytest.mark.parametrize("tied", [True, False])
def test_weights_copied_ahead_make_the_folder_save_pretrained_alone_makes(tmp_path, monkeypatch, tied):
    """What is copied while the model is built is what save_pretrained decides, tied or not."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune_trainer import weights_out
    from kubetune_trainer.convert import SHARD_BYTES, build_model, copy_ahead

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(2)
    state = {f"model.{key}": tensor for key, tensor in LlamaForCausalLM(config).state_dict().items()}
    torch.save(state, tmp_path / "checkpoint.pt")
    weights = torch.load(tmp_path / "checkpoint.pt", mmap=True, weights_only=True)
    taken, take = [], weights_out.CopyAhead.take
    monkeypatch.setattr(weights_out.CopyAhead, "take", lambda self, *args: taken.append(take(self, *args)) or taken[-1])

    ours, plain = tmp_path / "ours", tmp_path / "plain"
    ours.mkdir()
    with weights_out.kernel_copies(copy_ahead(weights, config.to_dict(), ours)):
        build_model(config.to_dict(), weights).save_pretrained(ours, max_shard_size=SHARD_BYTES)
    build_model(config.to_dict(), weights).save_pretrained(plain)  # safetensors' own writer

    assert taken == [True]
    assert sorted(path.name for path in ours.iterdir()) == sorted(path.name for path in plain.iterdir())
    assert json.loads((ours / "config.json").read_text()) == json.loads((plain / "config.json").read_text())
    with safe_open(ours / "model.safetensors", "pt") as got, safe_open(plain / "model.safetensors", "pt") as want:
        assert sorted(got.keys()) == sorted(want.keys()) and got.metadata() == want.metadata()
        assert ("lm_head.weight" in got.keys()) is not tied
        for name in want.keys():
            assert got.get_tensor(name).dtype == want.get_tensor(name).dtype
            assert got.get_tensor(name).equal(want.get_tensor(name)), name
