"""validateInputs: a wrong customWeightsPath fails the CPU-only prepare step, before any GPU."""

from pathlib import Path

import pytest

from kubetune_trainer.data import analyze
from kubetune_trainer.data.modelinfo import load_tokenizer
from kubetune_trainer.errors import UserError
from kubetune_trainer.inputs import check_custom_weights

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "data"


def test_missing_custom_weights_are_refused_naming_the_field(tmp_path):
    with pytest.raises(UserError, match=r"customWeightsPath .*missing.pt: no such file") as caught:
        check_custom_weights(str(tmp_path / "missing.pt"))
    assert caught.value.reason == "CustomWeightsMissing" and caught.value.permanent


def test_a_folder_without_shards_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="without sharded checkpoint files"):
        check_custom_weights(str(tmp_path))


@pytest.mark.parametrize("layout", ["file", "shards", "uri"])
def test_reachable_weights_pass(tmp_path, layout):
    if layout == "shards":
        (tmp_path / "__0_0.distcp").write_bytes(b"x")
        check_custom_weights(str(tmp_path))
    else:
        (tmp_path / "ep1-ba2-rank0.pt").write_bytes(b"x")
        prefix = "file://" if layout == "uri" else ""
        check_custom_weights(prefix + str(tmp_path / "ep1-ba2-rank0.pt"))


def test_prepare_checks_them_only_when_validate_inputs_is_on(make_config, tmp_path):
    config = make_config(EXAMPLES / "ift.jsonl", custom_weights_path=str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match="customWeightsPath"):
        analyze(config)
    assert analyze(config.model_copy(update={"validate_inputs": False})).stats.samples > 0


@pytest.mark.parametrize("model", ["/models/missing", "./missing", "org/name/extra"])
def test_a_model_folder_that_does_not_exist_is_a_user_error_not_a_retry(model):
    with pytest.raises(UserError, match=f"model {model}: no such folder") as caught:
        load_tokenizer(model)
    assert caught.value.reason == "ModelNotFound" and caught.value.permanent
