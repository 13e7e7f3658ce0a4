"""The checkpoints module on hand-made Composer-shaped checkpoints: names and the pointer,
what counts as whole, where a run resumes, and reading a sharded folder back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kubetune_trainer import checkpoints

INTEGRATIONS = {"huggingface": {"model": {"config": {"content": {"model_type": "llama", "layers": [1, 2]}}},
                                "tokenizer": {"vocab": {"file_extension": ".txt", "content": ["a", "b"]}},
                                "files": [{"name": "x"}, {"name": "y"}]}}


def save(folder: Path, name: str, value: float = 1.0) -> Path:
    """A file shaped like Composer's: {"state": {"model", "integrations", "optimizers"}}."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"model": {"model.weight": torch.full((4, 4), value)}, "integrations": INTEGRATIONS,
             "optimizers": {"Lion": {"state": {"m": torch.zeros(4, 4)}}}}
    torch.save({"state": state, "rng": []}, folder / name)
    return folder / name


def point(folder: Path, name: str) -> None:
    link = folder / checkpoints.LATEST
    if link.is_symlink():
        link.unlink()
    link.symlink_to(name)


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_names_the_pointer_and_composer_pointer_files(tmp_path):
    for name in ("ep0-ba2-rank0.pt", "ep0-ba10-rank0.pt", "ep1-ba4-rank0.pt"):
        save(tmp_path, name)
    (tmp_path / "ep0-ba3-rank1.pt").write_bytes(b"another rank's")
    (tmp_path / "ep0-ba6").mkdir()  # a folder without .metadata: not a sharded checkpoint
    assert [p.name for p in checkpoints.listed(tmp_path)] == ["ep1-ba4-rank0.pt", "ep0-ba10-rank0.pt",
                                                              "ep0-ba2-rank0.pt"]
    assert checkpoints.find_latest(tmp_path) == tmp_path / "ep1-ba4-rank0.pt"  # no pointer: the newest
    point(tmp_path, "ep0-ba2-rank0.pt")
    assert checkpoints.latest(tmp_path) == checkpoints.find_latest(tmp_path) == tmp_path / "ep0-ba2-rank0.pt"
    pointer_file = tmp_path / "latest-rank0.pt.symlink"  # what an object store holds instead of a link
    pointer_file.write_text("ep0-ba10-rank0.pt\n")
    assert checkpoints.follow(pointer_file) == tmp_path / "ep0-ba10-rank0.pt"
    assert checkpoints.follow(tmp_path / "latest-rank0.pt") == tmp_path / "ep0-ba2-rank0.pt"


def test_resumes_from_the_pointer_or_else_the_newest_whole_one_before_it(tmp_path):
    for name in ("ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt"):
        save(tmp_path, name)
    point(tmp_path, "ep0-ba4-rank0.pt")
    cut_short(tmp_path / "ep0-ba6-rank0.pt")  # a save killed before the pointer moved: not considered
    assert checkpoints.resume_point(tmp_path) == checkpoints.ResumePoint(tmp_path / "ep0-ba4-rank0.pt")

    cut_short(tmp_path / "ep0-ba4-rank0.pt")
    resume = checkpoints.resume_point(tmp_path)
    assert resume.checkpoint == tmp_path / "ep0-ba2-rank0.pt"
    assert resume.note.startswith("checkpoint ep0-ba4-rank0.pt unreadable (")
    assert resume.note.endswith("resumed from ep0-ba2-rank0.pt")

    (tmp_path / "ep0-ba2-rank0.pt").write_bytes(b"not a zip file")
    resume = checkpoints.resume_point(tmp_path)
    assert resume.checkpoint is None and "started from the initial weights" in resume.note
    assert "ep0-ba4-rank0.pt" in resume.note and "ep0-ba2-rank0.pt" in resume.note


def test_older_names_the_checkpoints_a_resume_falls_back_to_newest_first():
    names = ["ep0-ba2-rank0.pt", "ep1-ba10-rank0.pt", "ep0-ba8", "latest-rank0.pt.symlink", "ep2-ba20-rank0.pt",
             "ep0-ba8", "notes.txt"]  # an object store's listing: a sharded folder's name once per shard
    assert checkpoints.older(names, "ep1-ba10-rank0.pt") == ["ep0-ba8", "ep0-ba2-rank0.pt"]
    assert checkpoints.older(names, "ep0-ba2-rank0.pt") == []
    assert checkpoints.older(names, "latest-rank0.pt") == []  # not a checkpoint's name


def test_no_checkpoint_starts_from_the_weights_without_a_note(tmp_path):
    assert checkpoints.resume_point(tmp_path / "none") == checkpoints.ResumePoint(None)


def test_a_file_without_model_state_is_not_whole(tmp_path):
    torch.save({"state": {"integrations": {}}}, tmp_path / "ep0-ba2-rank0.pt")
    assert "state.model" in checkpoints.defect(tmp_path / "ep0-ba2-rank0.pt")


@pytest.fixture
def sharded(tmp_path) -> Path:
    import torch.distributed.checkpoint as dcp

    monolithic = save(tmp_path / "files", "ep0-ba2-rank0.pt", value=3.0)
    folder = tmp_path / "ep0-ba2"
    dcp.save(torch.load(monolithic, weights_only=False), checkpoint_id=folder)  # the layout FSDP writes
    return folder


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp in one process
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_a_sharded_folder_reads_back_what_was_saved_and_only_that(sharded):
    state = checkpoints.read_state(sharded)
    assert set(state) == {"model", "integrations"}
    assert torch.equal(state["model"]["model.weight"], torch.full((4, 4), 3.0))
    assert state["integrations"] == INTEGRATIONS  # nested dicts and lists, as saved
    assert checkpoints.step(sharded) == (0, 2) and checkpoints.defect(sharded) is None


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_a_sharded_folder_missing_a_shard_or_its_index_is_not_whole(sharded):
    shard = next(sharded.glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size - 1)
    assert "shorter than its index says" in checkpoints.defect(sharded)
    (sharded / checkpoints.SHARDED_METADATA).write_bytes(b"")
    assert checkpoints.defect(sharded).startswith("no readable .metadata")
