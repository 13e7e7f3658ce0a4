"""Model weights to safetensors, copying the bytes a checkpoint already holds inside the kernel.

`transformers`' `save_pretrained` decides what to write (tied weights, shards, the index) and
hands each shard to safetensors' `save_file`, which writes every byte through user memory: from
a memory-mapped checkpoint that is ~1.5x slower than a raw copy of the same bytes (BENCHMARKS.md,
finalization). Within `kernel_copies()`, `save_pretrained` writes with `save_file` below instead:
the same format (8 bytes of header size, the JSON header, the raw little-endian bytes), where
each tensor whose bytes lie unchanged in a file this process has mapped (`torch.load(mmap=True)`)
is copied from that file with `os.copy_file_range`, and any other from memory.

"Unchanged" is the kernel's word, not ours: a private file mapping's page that was written to is
a private copy, and /proc/self/pagemap says which pages still are the file's.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PAGE = os.sysconf("SC_PAGE_SIZE")
# /proc/self/pagemap: one little-endian u64 a page; bit 63 present, 62 swapped, 61 file page.
PRESENT, SWAPPED, FILE_PAGE = 1 << 63, 1 << 62, 1 << 61
DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
          "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int  # of `start` in the file
    path: str


def file_mappings(maps_text: str) -> list[Mapping]:
    """The file-backed regions of /proc/self/maps, by start address."""
    regions = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].endswith(" (deleted)"):
            continue
        start, end = (int(part, 16) for part in fields[0].split("-"))
        regions.append(Mapping(start, end, int(fields[2], 16), fields[5]))
    return sorted(regions, key=lambda region: region.start)


def unchanged(entries) -> bool:
    """Whether pages with these pagemap entries (a uint64 array) still hold their file's bytes:
    never touched (not present, not swapped), or present as the file's own page."""
    import numpy as np

    entries = np.asarray(entries, dtype=np.uint64)
    swapped = (entries & np.uint64(SWAPPED)) != 0
    private = ((entries & np.uint64(PRESENT)) != 0) & ((entries & np.uint64(FILE_PAGE)) == 0)
    return not bool((swapped | private).any())


class Sources:
    """Where in a mapped file a range of this process's memory lies, if its bytes are the file's.
    Without /proc (not Linux) it finds none, and every byte is written from memory."""

    def __init__(self) -> None:
        try:
            self.regions = file_mappings(Path("/proc/self/maps").read_text())
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        except OSError:
            self.regions, self.pagemap = [], None
        self.starts = [region.start for region in self.regions]
        self.files: dict[str, int] = {}

    def close(self) -> None:
        for fd in (self.pagemap, *self.files.values()):
            if fd is not None:
                os.close(fd)

    def find(self, address: int, size: int) -> tuple[int, int] | None:
        """(file descriptor, offset) of these bytes, or None: not a file's, or changed."""
        import numpy as np

        index = bisect.bisect_right(self.starts, address) - 1
        if index < 0 or size == 0:
            return None
        region = self.regions[index]
        if address + size > region.end:
            return None
        first, last = address // PAGE, (address + size - 1) // PAGE
        try:
            raw = os.pread(self.pagemap, 8 * (last - first + 1), 8 * first)
            if len(raw) != 8 * (last - first + 1) or not unchanged(np.frombuffer(raw, dtype="<u8")):
                return None
            if region.path not in self.files:
                self.files[region.path] = os.open(region.path, os.O_RDONLY)
        except OSError:  # pagemap restricted, or the file gone: write from memory
            return None
        return self.files[region.path], region.offset + address - region.start


def header(tensors: dict, metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[str, int]]]:
    """The safetensors header (padded to 8 bytes) and each tensor's (name, byte size), in the
    order their bytes follow it."""
    entries: dict = {"__metadata__": metadata} if metadata else {}
    layout, offset = [], 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": DTYPES[str(tensor.dtype).removeprefix("torch.")],
                         "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        layout.append((name, size))
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, layout


def cpu_contiguous(tensors: dict) -> dict:
    """safetensors.torch.save_file's contract: contiguous CPU tensors, no two sharing memory."""
    tensors = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    if any(tensor.device.type != "cpu" for tensor in tensors.values()):
        raise ValueError("tensors must be on the CPU to be written")
    return tensors


def save_file(tensors: dict, filename: str, metadata: dict[str, str] | None = None,
              ahead: "CopyAhead | None" = None) -> None:
    """safetensors.torch.save_file; `ahead`: the bytes of a predicted call, copied meanwhile,
    which this call takes over if it is that call (same file, header and tensors' memory)."""
    tensors = cpu_contiguous(tensors)
    head, layout = header(tensors, metadata)
    if ahead is not None and ahead.take(filename, head, tensors):
        return
    sources = Sources()
    out = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_at(out, memoryview(head), 0)
        write_tensors(out, tensors, placed(layout, len(head)), sources)
    finally:
        os.close(out)
        sources.close()


def placed(layout: list[tuple[str, int]], start: int) -> list[tuple[str, int, int]]:
    """(name, byte size, position in the file) of each tensor laid out from `start`."""
    result, position = [], start
    for name, size in layout:
        result.append((name, size, position))
        position += size
    return result


def write_tensors(out: int, tensors: dict, places: list[tuple[str, int, int]], sources: Sources) -> None:
    """Each tensor's bytes at its place: copied from the file that holds them unchanged, else
    written from memory."""
    for name, size, position in places:
        tensor = tensors[name]
        found = sources.find(tensor.data_ptr(), size)
        if not (found and _copied(found[0], found[1], out, position, size)) and size:
            _write_memory(out, tensor, position)


def _write_memory(out: int, tensor, position: int) -> None:
    import torch

    _write_at(out, memoryview(tensor.view(-1).view(torch.uint8).numpy()), position)


class CopyAhead:
    """The file `save_file(tensors, filename, metadata)` would write, its tensors' bytes copied
    on a thread from now on, largest first, while the caller builds what makes the real call
    (the model, `save_pretrained`'s decisions): the copies take the kernel's time, not the GIL.
    A real call for the same file, header and tensor memory takes the file over (`take`) and
    rewrites from memory any tensor whose bytes are not (or no longer) the mapped file's; any
    other call writes its file anew."""

    def __init__(self, tensors: dict, filename: str, metadata: dict[str, str] | None = None):
        import threading

        self.tensors = cpu_contiguous(tensors)
        self.filename = filename
        self.head, layout = header(self.tensors, metadata)
        self.places = placed(layout, len(self.head))
        self.pointers = [self.tensors[name].data_ptr() for name, _, _ in self.places]
        self.out = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.failed: BaseException | None = None
        self.sources: Sources | None = None
        self.thread = threading.Thread(target=self._copy, name="copy-ahead", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        try:
            self.sources = Sources()
            write_tensors(self.out, self.tensors, sorted(self.places, key=lambda place: -place[1]), self.sources)
        except BaseException as error:  # reported by `take`, which then writes the file anew
            self.failed = error

    def take(self, filename: str, head: bytes, tensors: dict) -> bool:
        """Complete the file if this is its call; False otherwise (a call for this file then
        writes it anew)."""
        if self.out is None or filename != self.filename:
            return False
        self.thread.join()
        same = (head == self.head and self.failed is None
                and [tensors[name].data_ptr() for name, _, _ in self.places] == self.pointers)
        try:
            if same:
                for name, size, position in self.places:
                    if size and self.sources.find(tensors[name].data_ptr(), size) is None:
                        _write_memory(self.out, tensors[name], position)
                _write_at(self.out, memoryview(self.head), 0)  # last: the bytes it describes are in place
        finally:
            self.close(keep=True)  # this call's file, completed here or written anew by the caller
        return same

    def close(self, keep: bool = False) -> None:
        """Done with the file; unless kept, it is removed (no call came for it: no stray file)."""
        self.thread.join()
        if self.out is not None:
            os.close(self.out)
            self.out = None
            if not keep:
                os.unlink(self.filename)
        if self.sources is not None:
            self.sources.close()
            self.sources = None


def _write_at(fd: int, data: memoryview, position: int) -> None:
    while data:
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written


def _copied(source: int, offset: int, out: int, position: int, size: int) -> bool:
    """Copy in the kernel; False where it cannot (another filesystem on an older kernel, a
    filesystem without support), and the caller writes the bytes itself."""
    try:
        while size:
            copied = os.copy_file_range(source, out, size, offset, position)
            if copied == 0:  # the file is shorter than its mapping: truncated meanwhile
                return False
            offset, position, size = offset + copied, position + copied, size - copied
    except (OSError, AttributeError):  # AttributeError: no copy_file_range on this platform
        return False
    return True


@contextlib.contextmanager
def kernel_copies(ahead: CopyAhead | None = None) -> Iterator[None]:
    """`transformers`' `save_pretrained` writes safetensors with `save_file` above meanwhile,
    taking over `ahead` where it is the file it writes."""
    from transformers import modeling_utils

    original = modeling_utils.safe_save_file
    modeling_utils.safe_save_file = save_file if ahead is None else functools.partial(save_file, ahead=ahead)
    try:
        yield
    finally:
        modeling_utils.safe_save_file = original
        if ahead is not None:
            ahead.close()
