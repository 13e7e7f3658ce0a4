"""Every source kind, read for real: local files and folders, fsspec URIs (file://, memory://),
Delta tables written with deltalake, and a Hugging Face dataset from a local datasets cache."""

from __future__ import annotations

import glob
import json
import os
import uuid

import fsspec
import pytest

from kubetune_trainer.config import TaskType
from kubetune_trainer.data.records import Unreadable
from kubetune_trainer.data.sources import (hidden, hub_dataset_name, local_bytes, local_files, read_records,
                                           record_chunks, relative)
from kubetune_trainer.errors import UserError

from .conftest import BROKEN, EXAMPLES

IFT, CHAT, CPT = TaskType.INSTRUCTION_FINETUNE, TaskType.CHAT_COMPLETION, TaskType.CONTINUED_PRETRAIN
ROWS = [{"prompt": "one plus one?", "response": " two"}, {"prompt": "two plus two?", "response": " four"}]


def listing(uri, task=IFT):
    return [(str(record.location), record.value) for record in read_records(uri, task)]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_file_keeps_line_numbers_and_skips_blank_lines():
    records = list(read_records(str(BROKEN / "ift_broken.jsonl"), IFT))
    lines = [record.location.line for record in records]
    assert lines == [1, 2, 3, 4, 5, 6, 8, 9]  # line 7 is blank
    assert records[0].location.source == str(BROKEN / "ift_broken.jsonl")
    assert isinstance(records[1].value, Unreadable) and records[1].value.rule.startswith("invalid JSON: ")


def test_invalid_utf8_is_a_record_problem(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    [record] = read_records(str(tmp_path / "bad.jsonl"), IFT)
    assert record.value.rule == "line is not valid UTF-8 (byte 0xff at byte 13); save the file as UTF-8"


def test_local_folder_reads_jsonl_files_recursively_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    write_jsonl(tmp_path / "a" / "part.jsonl", ROWS[:1])
    (tmp_path / "notes.txt").write_text("not data")
    write_jsonl(tmp_path / ".hidden" / "x.jsonl", ROWS)
    assert listing(str(tmp_path)) == [(f"{tmp_path}/a/part.jsonl:1", ROWS[0]), (f"{tmp_path}/b.jsonl:1", ROWS[1])]


def test_file_uri_reads_the_same_and_reports_uris(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    assert listing(f"file://{tmp_path}/train.jsonl") == [
        (f"file://{tmp_path}/train.jsonl:1", ROWS[0]), (f"file://{tmp_path}/train.jsonl:2", ROWS[1])]


def test_memory_uri_folder_of_text_files():
    root = f"memory://kt-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    fs.pipe({f"{root}/docs/a.txt": b"alpha", f"{root}/docs/deep/b.txt": b"beta", f"{root}/docs/c.md": b"skip"})
    assert listing(f"{root}/docs", CPT) == [(f"{root}/docs/a.txt", "alpha"), (f"{root}/docs/deep/b.txt", "beta")]


def test_example_pretraining_folder_is_recursive_and_skips_other_files():
    sources = [location for location, _ in listing(str(EXAMPLES / "cpt"), CPT)]
    names = [os.path.relpath(location, EXAMPLES / "cpt") for location in sources]
    assert names == ["kubernetes/jobs.txt", "kubernetes/services.txt", "operators.txt",
                     "training/checkpoints.txt", "training/packing.txt"]


def write_delta(path, rows):
    import pyarrow as pa
    from deltalake import write_deltalake

    write_deltalake(str(path), pa.Table.from_pylist(rows))
    return path


def test_delta_table_by_path_and_by_file_uri(tmp_path):
    table = write_delta(tmp_path / "table", ROWS)
    assert listing(str(table)) == [(f"{table}:1", ROWS[0]), (f"{table}:2", ROWS[1])]
    assert [value for _, value in listing(f"file://{table}")] == ROWS


def test_delta_chat_rows_keep_nested_messages(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    table = write_delta(tmp_path / "chat", [{"messages": messages, "id": 1}])
    assert listing(str(table), CHAT) == [(f"{table}:1", {"messages": messages, "id": 1})]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A datasets cache holding `acme/tiny-ift` as if loaded from the hub once, the hub offline:
    what an air-gapped cluster with a pre-filled HF_DATASETS_CACHE volume sees."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "hf-datasets"
    data = write_jsonl(tmp_path / "src" / "train.jsonl", ROWS)
    builder = Json(cache_dir=str(cache), dataset_name="tiny-ift", repo_id="acme/tiny-ift",
                   hash="0" * 40, data_files={"train": str(data)})
    builder.download_and_prepare()
    [config_dir] = glob.glob(f"{cache}/acme___tiny-ift/default-*")
    os.rename(config_dir, f"{cache}/acme___tiny-ift/default")  # the hub's config name
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_dataset_is_loaded_with_its_split(hub_cache, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # "acme/tiny-ift/train" is no local path here
    assert listing("acme/tiny-ift/train") == [("acme/tiny-ift/train:1", ROWS[0]), ("acme/tiny-ift/train:2", ROWS[1])]
    with pytest.raises(UserError, match="acme/tiny-ift/test: cannot load the Hugging Face dataset: Unknown split"):
        listing("acme/tiny-ift/test")
    with pytest.raises(UserError, match=r"acme/missing/train: no such local folder .*not in the local datasets cache "
                                        r".* while the hub is off \(HF_HUB_OFFLINE=1\)"):
        listing("acme/missing/train")


@pytest.mark.parametrize("path, expected", [
    ("org/name/train", ("org/name", "train")),
    ("squad/validation", ("squad", "validation")),
    ("org/name.v2/train[:10%]", ("org/name.v2", "train[:10%]")),
    ("data/train.jsonl", None),
    ("/abs/org/name/train", None),
    ("./org/name/train", None),
    ("s3://bucket/name/train", None),
    ("a/b/c/d", None),
    ("train", None),
])
def test_hub_names_are_told_from_paths(path, expected):
    assert hub_dataset_name(path) == expected


def test_missing_paths_are_named(tmp_path):
    for missing in (str(tmp_path / "nope.jsonl"), "data/nope.jsonl", f"file://{tmp_path}/nope"):
        with pytest.raises(UserError, match=f"{missing}: no such file or folder"):
            listing(missing)


def test_folders_without_data_files_say_so(tmp_path):
    (tmp_path / "readme.md").write_text("nothing")
    with pytest.raises(UserError, match=r"no \.jsonl files in this folder"):
        listing(str(tmp_path))
    with pytest.raises(UserError, match=r"no \.txt files in this folder"):
        listing(str(tmp_path), CPT)


def test_chunks_run_across_files_and_know_each_record_s_place(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS + [ROWS[0]])
    write_jsonl(tmp_path / "d" / "b.jsonl", ROWS)
    chunks = list(record_chunks(str(tmp_path / "d"), IFT, 2))
    assert [len(chunk) for chunk in chunks] == [2, 2, 1]
    assert [str(chunk.location(position)) for chunk in chunks for position in range(len(chunk))] == \
        [f"{tmp_path}/d/a.jsonl:{n}" for n in (1, 2, 3)] + [f"{tmp_path}/d/b.jsonl:{n}" for n in (1, 2)]
    assert list(chunks[1].values()) == [ROWS[0], ROWS[0]]


def test_text_files_travel_unread_and_are_read_with_their_size_checked(tmp_path):
    for name, text in (("a.txt", "short"), ("b.txt", "x" * 100)):
        (tmp_path / name).write_text(text)
    [chunk] = record_chunks(str(tmp_path), CPT, 512, limit=50)
    assert chunk.paths == [f"{tmp_path}/a.txt", f"{tmp_path}/b.txt"]  # what goes to a worker: the paths
    short, big = chunk.values()
    assert short == "short" and isinstance(big, Unreadable) and "file is 100 bytes" in big.rule
    assert str(chunk.location(1)) == f"{tmp_path}/b.txt"


@pytest.mark.parametrize("path, root, expected", [
    ("/data/docs/a.txt", "/data/docs", "a.txt"), ("/data/docs/x/a.txt", "/data/docs", "x/a.txt"),
    ("/data/docsa/a.txt", "/data/docs", "../docsa/a.txt"), ("/data/docs", "/data/docs", "."),
])
def test_paths_under_the_root_are_cut_as_relpath_would(path, root, expected):
    assert relative(path, root) == expected


@pytest.mark.parametrize("path, root", [
    ("/d/a.txt", "/d"), ("/d/.a.txt", "/d"), ("/d/x/.y/a.txt", "/d"), ("/d/x.y/a.txt", "/d"), ("/d/x/a.", "/d"),
    ("/d/.x/a.txt", "/d/.x"), ("/e/a.txt", "/d"), ("/d/a..txt", "/d"), ("/d/x/..y", "/d"),
])
def test_hidden_means_a_part_below_the_root_starts_with_a_dot(path, root):
    assert hidden(path, root) == any(part.startswith(".") for part in relative(path, root).split("/"))


def test_a_local_file_is_read_whole_unless_over_the_limit(tmp_path):
    for size in (0, 1, 4096, 3 * 2**20 + 7):
        (tmp_path / "doc.txt").write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        assert local_bytes(str(tmp_path / "doc.txt"), size) == (tmp_path / "doc.txt").read_bytes()
    refused = local_bytes(str(tmp_path / "doc.txt"), 100)
    assert isinstance(refused, Unreadable) and "is 3,145,735 bytes, over the limit of 100 bytes" in refused.rule


def test_a_local_folder_lists_what_fsspec_finds(tmp_path):
    root = tmp_path / "data"
    for name in ("a.txt", "sub/b.txt", "sub/deeper/c.txt", ".hidden/d.txt", "sub/.e.txt", "f.jsonl"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    (root / "to-sub").symlink_to(root / "sub")  # a link to a folder is listed, not followed
    (root / "to-a.txt").symlink_to(root / "a.txt")
    (root / "dangling.txt").symlink_to(tmp_path / "missing")
    assert sorted(local_files(str(root))) == sorted(fsspec.filesystem("file").find(str(root)))
    assert len(local_files(str(root))) == 9
