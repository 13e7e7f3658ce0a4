"""customWeightsPath in its three shapes, a mismatching architecture, and load errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune_trainer.config import Distributed
from kubetune_trainer.errors import UserError
from kubetune_trainer.train import build, run_train
from kubetune_trainer.train.model import composer_model, load_custom_weights
from kubetune_trainer.train.runtime import runtime_for

from .conftest import config_factory

CPU = runtime_for(Distributed(), device_batch_size=4, flash_attention=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir, mlflow_uri):
    """A real Composer checkpoint of a 2-batch run, and the weights it holds."""
    make = config_factory(tmp_path_factory.mktemp("weights") / "work", tiny_model_dir, mlflow_uri)
    config = make(training_duration="2ba", learning_rate=1e-2)
    result = run_train(config)
    weights = torch.load(result["latestCheckpoint"], weights_only=False)["state"]["model"]
    return Path(config.checkpoint_dir), weights


def assert_holds(model, weights):
    state = model.state_dict()
    assert state.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, msg=name)


def load(tiny_model_dir, path):
    model = composer_model(str(tiny_model_dir), CPU)
    load_custom_weights(model, str(path), str(tiny_model_dir))
    return model


def test_trained_weights_differ_from_the_pretrained_ones(checkpoint, tiny_model_dir):
    _, weights = checkpoint
    pretrained = composer_model(str(tiny_model_dir), CPU).state_dict()
    assert any(not torch.equal(pretrained[name], tensor) for name, tensor in weights.items())


@pytest.mark.parametrize("pointer", ["ep0-ba2-rank0.pt", "latest-rank0.pt"])
def test_loads_a_checkpoint_file_or_the_latest_symlink(checkpoint, tiny_model_dir, pointer):
    folder, weights = checkpoint
    assert_holds(load(tiny_model_dir, folder / pointer), weights)


def test_loads_through_a_composer_symlink_file(checkpoint, tiny_model_dir, tmp_path):
    folder, weights = checkpoint
    pointer = folder / "latest-rank0.pt.symlink"  # what Composer uploads next to object-store checkpoints
    pointer.write_text("ep0-ba2-rank0.pt")
    assert_holds(load(tiny_model_dir, pointer), weights)


def test_loads_a_folder_of_sharded_distcp_files(checkpoint, tiny_model_dir, tmp_path):
    import torch.distributed.checkpoint as dcp

    _, weights = checkpoint
    sharded = tmp_path / "ep0-ba2"
    dcp.save({"state": {"model": weights}}, checkpoint_id=sharded)  # the layout FSDP runs write
    assert list(sharded.glob("*.distcp")) and (sharded / ".metadata").is_file()
    assert_holds(load(tiny_model_dir, sharded), weights)


def test_a_run_starts_from_the_custom_weights(checkpoint, make_config):
    folder, weights = checkpoint
    assembly = build(make_config(custom_weights_path=str(folder / "latest-rank0.pt")))
    try:
        assert_holds(assembly.trainer.state.model, weights)
    finally:
        assembly.trainer.close()


def test_mismatching_architecture_is_a_user_error_naming_the_field(checkpoint, tiny_model_dir, tmp_path):
    _, weights = checkpoint
    one_layer = {k: v for k, v in weights.items() if ".layers.1." not in k}  # a shallower model
    path = tmp_path / "other.pt"
    torch.save({"state": {"model": one_layer}}, path)
    with pytest.raises(UserError, match="customWeightsPath .* does not match") as error:
        load(tiny_model_dir, path)
    assert error.value.reason == "CustomWeightsMismatch" and error.value.permanent


def test_missing_custom_weights_is_a_user_error(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="customWeightsPath") as error:
        load(tiny_model_dir, tmp_path / "nothing.pt")
    assert error.value.reason == "CustomWeightsMissing"


def test_unloadable_model_is_a_user_error_naming_the_model(make_config, tmp_path):
    with pytest.raises(UserError, match="model .*could not be loaded") as error:
        run_train(make_config(model=str(tmp_path / "no-such-model")))
    assert error.value.reason == "ModelLoadFailed"


def test_missing_prepared_data_fails_before_loading_anything(make_config, tmp_path):
    with pytest.raises(UserError) as error:
        run_train(make_config(work_dir=str(tmp_path / "empty")))
    assert error.value.reason == "PreparedDataMissing"
