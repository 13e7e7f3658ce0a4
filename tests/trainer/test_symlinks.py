"""Data and weights paths are read as written, but no symlink in them leads out of where they were named."""

import os
from pathlib import Path

import pytest
import yaml

from kubetune.cli import main
from kubetune_trainer.config import RunConfig
from kubetune_trainer.errors import UserError
from kubetune_trainer.inputs import check_confined

LINE = '{"prompt": "one plus one?", "response": " two"}\n'


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    """A run storage root: this run's folder, a folder of inputs, another run's folder; and a
    private file outside it all."""
    root = tmp_path / "storage"
    for folder in ("team/me", "team/inputs", "team/other/data"):
        (root / folder).mkdir(parents=True)
    (root / "team/inputs/train.jsonl").write_text(LINE)
    (root / "team/other/data/train.jsonl").write_text(LINE)
    (tmp_path / "secret").write_text("token")
    return root


def config(storage: Path, data: Path, **fields) -> RunConfig:
    return RunConfig(run_name="me", run_uid="u1", namespace="team", model="tiny", train_data_path=str(data),
                     work_dir=str(storage / "team" / "me"), experiment_path="/e", register_to="a.b.c", **fields)


def refusal(run: RunConfig) -> str:
    with pytest.raises(UserError) as refused:
        check_confined(run)
    assert refused.value.reason == "InvalidInput" and refused.value.permanent
    return refused.value.message


def test_a_data_file_that_links_out_of_its_folder_is_refused_naming_the_path_and_the_target(storage):
    link = storage / "team/inputs/eval.jsonl"
    link.symlink_to(storage.parent / "secret")
    message = refusal(config(storage, storage / "team/inputs/train.jsonl", eval_data_path=str(link)))
    assert message.startswith(f"evalDataPath {link}: the symlink {link} leads to {storage.parent / 'secret'}, "
                              f"outside {link.parent}")


@pytest.mark.parametrize("make", [
    lambda inputs, outside: (inputs / "more.jsonl").symlink_to(outside / "secret"),
    lambda inputs, outside: (inputs / "sub").symlink_to(outside),  # a folder: its files are outside
    lambda inputs, outside: (inputs / "peek.jsonl").symlink_to(inputs.parent / "other/data/train.jsonl"),
], ids=["file-out-of-storage", "folder-out-of-storage", "into-another-run"])
def test_a_link_inside_a_data_folder_may_not_leave_it(storage, make):
    inputs = storage / "team/inputs"
    make(inputs, storage.parent)
    message = refusal(config(storage, inputs))
    assert message.startswith(f"trainDataPath {inputs}: the symlink {inputs}/") and f"outside {inputs};" in message


def test_a_folder_on_the_way_that_links_into_another_run_s_folder_is_refused(storage):
    (storage / "team/borrowed").symlink_to(storage / "team/other")
    message = refusal(config(storage, storage / "team/borrowed/data/train.jsonl"))
    assert f"in {storage / 'team/other'} instead of {storage / 'team/borrowed'}" in message


def test_a_folder_on_the_way_that_links_out_of_the_storage_is_refused(storage, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/train.jsonl").write_text(LINE)
    (storage / "team/mounted").symlink_to(tmp_path / "elsewhere")
    message = refusal(config(storage, storage / "team/mounted/train.jsonl"))
    assert f"outside the run storage {storage}" in message


def test_links_that_stay_where_they_were_named_are_read(storage):
    inputs = storage / "team/inputs"
    (inputs / "latest.jsonl").symlink_to("train.jsonl")  # a version pointer beside its target
    (inputs / "v1").mkdir()
    (inputs / "v1/again.jsonl").symlink_to(inputs / "train.jsonl")
    (inputs / "loop.jsonl").symlink_to(inputs / "loop.jsonl")  # unreadable: the reader says so, not this
    check_confined(config(storage, inputs))
    check_confined(config(storage, inputs / "latest.jsonl"))
    # Named as written, another run's files are the user's choice (a later run from its checkpoint).
    check_confined(config(storage, storage / "team/other/data/train.jsonl"))


def test_custom_weights_that_link_elsewhere_are_refused(storage):
    checkpoints = storage / "team/other/checkpoints"
    checkpoints.mkdir()
    (checkpoints / "ep1-ba9-rank0.pt").write_bytes(b"weights")
    (checkpoints / "latest-rank0.pt").symlink_to("ep1-ba9-rank0.pt")
    data = storage / "team/inputs/train.jsonl"
    check_confined(config(storage, data, custom_weights_path=str(checkpoints / "latest-rank0.pt")))
    (storage / "team/inputs/weights.pt").symlink_to(checkpoints / "ep1-ba9-rank0.pt")
    message = refusal(config(storage, data, custom_weights_path=str(storage / "team/inputs/weights.pt")))
    assert message.startswith(f"customWeightsPath {storage / 'team/inputs/weights.pt'}: the symlink")


def test_kubetune_validate_refuses_a_link_out_with_one_clear_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(LINE)
    (data / "shadow.jsonl").symlink_to("/etc/shadow" if os.path.exists("/etc/shadow") else "/etc/hostname")
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"apiVersion": "kubetune.dev/v1alpha1", "kind": "TrainingRun",
                                   "metadata": {"name": "linked"},
                                   "spec": {"model": str(tmp_path / "no-model-needed"), "trainDataPath": str(data),
                                            "registerTo": "main.tests.linked"}}))
    assert main(["validate", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"trainDataPath {data}: the symlink {data / 'shadow.jsonl'} leads to /etc/" in err
    assert "Traceback" not in err


def test_links_under_a_folder_are_found_in_os_walk_order(tmp_path):
    from kubetune_trainer.inputs import _links_under

    for name in ("a/b/c.txt", "a/d.txt", "e/f.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    for link, target in (("a/to-e", "e"), ("a/b/to-c", "a/b/c.txt"), ("dangling", "missing"), ("e/to-root", ".")):
        (tmp_path / link).symlink_to(tmp_path / target)
    walked = [Path(parent) / name for parent, subfolders, files in os.walk(tmp_path)
              for name in [*subfolders, *files] if (Path(parent) / name).is_symlink()]
    assert list(_links_under(tmp_path)) == walked and len(walked) == 4
