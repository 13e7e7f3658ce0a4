"""Safetensors written with the checkpoint's bytes copied in the kernel: the same file contents
safetensors itself writes, and never a stale byte of a tensor changed after loading."""

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kubetune_trainer import weights_out
from kubetune_trainer.weights_out import FILE_PAGE, PRESENT, SWAPPED, Sources, file_mappings, save_file, unchanged


def mapped_tensors(tmp_path):
    saved = {"a": torch.arange(50_000, dtype=torch.float32), "b": torch.ones(3, 7, dtype=torch.bfloat16),
             "c": torch.tensor([1, 2, 3], dtype=torch.int64)}
    torch.save(saved, tmp_path / "checkpoint.pt")
    return saved, torch.load(tmp_path / "checkpoint.pt", mmap=True, weights_only=True)


def test_what_it_writes_is_what_safetensors_reads_back(tmp_path):
    saved, loaded = mapped_tensors(tmp_path)
    save_file({**loaded, "fresh": torch.zeros(0), "view": torch.arange(12.0).reshape(3, 4).t()},
              str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    back = load_file(tmp_path / "w.safetensors")
    for name, tensor in saved.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    assert torch.equal(back["view"], torch.arange(12.0).reshape(3, 4).t()) and back["fresh"].numel() == 0
    with safe_open(tmp_path / "w.safetensors", framework="pt") as opened:
        assert opened.metadata() == {"format": "pt"}


def test_mapped_bytes_come_from_the_file_and_changed_ones_from_memory(tmp_path):
    _, loaded = mapped_tensors(tmp_path)
    sources = Sources()
    try:
        found = sources.find(loaded["a"].data_ptr(), loaded["a"].numel() * 4)
        assert found is not None and found[1] > 0  # somewhere inside the checkpoint's zip
        assert sources.find(torch.ones(100_000).data_ptr(), 400_000) is None  # anonymous memory
    finally:
        sources.close()
    loaded["a"].add_(1)  # a private copy of its pages now: the file no longer holds these bytes
    sources = Sources()
    try:
        assert sources.find(loaded["a"].data_ptr(), loaded["a"].numel() * 4) is None
    finally:
        sources.close()
    save_file(loaded, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_file(tmp_path / "w.safetensors")["a"], torch.arange(50_000, dtype=torch.float32) + 1)


def test_a_page_is_the_files_only_untouched_or_present_as_a_file_page():
    assert unchanged([0, PRESENT | FILE_PAGE, FILE_PAGE])
    assert not unchanged([0, PRESENT])  # written: the process's own copy
    assert not unchanged([SWAPPED])     # only anonymous pages swap


def test_only_live_file_mappings_are_sources():
    maps = ("7f00-7f10 r--p 00001000 fe:00 12 /data/ckpt.pt\n"
            "7f10-7f20 rw-p 00000000 00:00 0 \n"
            "7e00-7e10 r--p 00000000 fe:00 13 /data/old.pt (deleted)\n"
            "7d00-7d10 rw-p 00000000 00:00 0 [heap]\n")
    assert [(m.start, m.offset, m.path) for m in file_mappings(maps)] == [(0x7f00, 0x1000, "/data/ckpt.pt")]


def test_save_pretrained_is_given_back_its_own_writer():
    from transformers import modeling_utils

    before = modeling_utils.safe_save_file
    with weights_out.kernel_copies():
        assert modeling_utils.safe_save_file is save_file
    assert modeling_utils.safe_save_file is before


def test_where_the_kernel_cannot_copy_the_bytes_are_written_from_memory(tmp_path, monkeypatch):
    import errno
    import os

    saved, loaded = mapped_tensors(tmp_path)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "cross-device copy")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    save_file(loaded, str(tmp_path / "w.safetensors"))
    back = load_file(tmp_path / "w.safetensors")
    assert calls and all(torch.equal(back[name], tensor) for name, tensor in saved.items())


def spied_takes(monkeypatch) -> list[bool]:
    """What each CopyAhead.take returned: True where the call took the copied file over."""
    taken, take = [], weights_out.CopyAhead.take

    def spy(self, *args):
        taken.append(take(self, *args))
        return taken[-1]

    monkeypatch.setattr(weights_out.CopyAhead, "take", spy)
    return taken


def test_a_file_copied_ahead_is_taken_over_by_its_call_with_the_same_bytes(tmp_path, monkeypatch):
    _, loaded = mapped_tensors(tmp_path)
    taken = spied_takes(monkeypatch)
    save_file(loaded, str(tmp_path / "plain.safetensors"), {"format": "pt"})
    ahead = weights_out.CopyAhead(loaded, str(tmp_path / "w.safetensors"), {"format": "pt"})
    save_file(loaded, str(tmp_path / "w.safetensors"), {"format": "pt"}, ahead=ahead)
    assert taken == [True]
    assert (tmp_path / "w.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def test_a_tensor_changed_after_it_was_copied_ahead_is_written_from_memory(tmp_path, monkeypatch):
    _, loaded = mapped_tensors(tmp_path)
    taken = spied_takes(monkeypatch)
    ahead = weights_out.CopyAhead(loaded, str(tmp_path / "w.safetensors"))
    ahead.thread.join()  # its bytes are copied from the file: now change them in memory
    loaded["a"].add_(1)
    save_file(loaded, str(tmp_path / "w.safetensors"), ahead=ahead)
    assert taken == [True]
    assert torch.equal(load_file(tmp_path / "w.safetensors")["a"], torch.arange(50_000, dtype=torch.float32) + 1)


def test_a_copy_ahead_that_could_not_plan_leaves_its_call_to_write_the_file_anew(tmp_path, monkeypatch):
    saved, loaded = mapped_tensors(tmp_path)
    taken = spied_takes(monkeypatch)
    plan = weights_out.plan
    monkeypatch.setattr(weights_out, "plan", lambda *args: (_ for _ in ()).throw(ValueError("no plan")))
    ahead = weights_out.CopyAhead(loaded, str(tmp_path / "w.safetensors"))  # planned on the caller's thread
    monkeypatch.setattr(weights_out, "plan", plan)
    save_file(loaded, str(tmp_path / "w.safetensors"), ahead=ahead)
    assert taken == [False]
    assert all(torch.equal(load_file(tmp_path / "w.safetensors")[name], tensor) for name, tensor in saved.items())


def test_a_call_other_than_the_one_copied_ahead_writes_its_file_anew_and_no_guess_is_left(tmp_path, monkeypatch):
    saved, loaded = mapped_tensors(tmp_path)
    taken = spied_takes(monkeypatch)
    guessed = str(tmp_path / "w.safetensors")
    ahead = weights_out.CopyAhead(loaded, guessed)
    fewer = {"a": loaded["a"], "c": loaded["c"]}
    save_file(fewer, guessed, ahead=ahead)  # the same file, other tensors
    assert taken == [False] and load_file(guessed).keys() == {"a", "c"}
    assert torch.equal(load_file(guessed)["a"], saved["a"])

    ahead = weights_out.CopyAhead(loaded, str(tmp_path / "guess.safetensors"))
    with weights_out.kernel_copies(ahead):  # save_pretrained wrote other files (shards) instead
        save_file(fewer, str(tmp_path / "model-00001-of-00002.safetensors"), ahead=ahead)
    assert not (tmp_path / "guess.safetensors").exists()
    assert load_file(tmp_path / "model-00001-of-00002.safetensors").keys() == {"a", "c"}


def test_bytes_are_arranged_at_their_sources_in_page_offsets_as_far_as_sizes_allow():
    from kubetune_trainer.weights_out import PAGE, arranged

    # Page-aligned sources (as align_storages saves them): whole-page tensors keep the phase, a
    # half-page one moves it, and another half-page one (placed next, the smallest) moves it back.
    sizes = {"norm": PAGE // 2, "embed": 64 * PAGE, "q": 4 * PAGE, "mlp": 3 * PAGE + PAGE // 2, "head": 64 * PAGE}
    order, start = arranged(sizes, dict.fromkeys(sizes, 0))
    assert start == 0 and sorted(order) == sorted(sizes)
    at, aligned = start, []
    for name in order:
        aligned += [name] if at == 0 else []
        at = (at + sizes[name]) % PAGE
    assert set(aligned) == {"embed", "head", "q", "mlp"}  # all but the one half-page filler
    assert arranged(sizes, dict.fromkeys(sizes)) == (list(sizes), None)  # nothing from files: as given


def test_a_page_aligned_checkpoints_tensors_land_at_their_in_page_offsets(tmp_path):
    import torch.utils.serialization.config as serialization

    from kubetune_trainer.checkpoints import align_storages
    from kubetune_trainer.weights_out import PAGE, plan

    saved = {"a": torch.arange(4096.0), "b": torch.ones(1024 + 512), "c": torch.zeros(2048)}
    before = serialization.save.storage_alignment
    align_storages()
    try:
        torch.save(saved, tmp_path / "checkpoint.pt")
    finally:  # a process-wide setting (monkeypatch's undo hides torch's config entry)
        serialization.save.storage_alignment = before
    loaded = torch.load(tmp_path / "checkpoint.pt", mmap=True, weights_only=True)
    sources = Sources()
    try:
        head, places = plan(loaded, {"format": "pt"}, sources)
    finally:
        sources.close()
    assert all(found is not None and found[1] % PAGE == 0 for _, _, _, found in places)
    assert all(position % PAGE == 0 for _, _, position, _ in places)  # the 1.5-page one last
    save_file(loaded, str(tmp_path / "w.safetensors"))
    back = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(back[name], tensor) for name, tensor in saved.items())
