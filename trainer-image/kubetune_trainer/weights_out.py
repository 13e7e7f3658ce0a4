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

Two things make the copies as fast as a raw copy: the bytes are laid out so that tensors keep
their source's offset within a page (`arranged`; the trainer saves page-aligned checkpoints),
and `CopyAhead` starts them on a thread right after the checkpoint is unpickled, while the
model skeleton is built and `save_pretrained` decides; its call then takes the file over.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

PAGE = os.sysconf("SC_PAGE_SIZE")
STEP = 64 * 2**10  # bytes the kernel copies at a time (a pipe's 16 pages)
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


# A line of /proc/self/maps: start-end perms offset device inode path (file-backed: an absolute path).
MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \S+ +(/.*)$", re.MULTILINE)


def file_mappings(maps_text: str) -> list[Mapping]:
    """The file-backed regions of /proc/self/maps, by start address. One regex over the text:
    a process with torch and transformers maps ~1,500 regions, which a loop of splits parsed
    in 3x the time."""
    regions = [Mapping(int(start, 16), int(end, 16), int(offset, 16), path)
               for start, end, offset, path in MAPS_LINE.findall(maps_text) if not path.endswith(" (deleted)")]
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


def byte_size(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def arranged(sizes: dict[str, int], phases: dict[str, int | None]) -> tuple[list[str], int | None]:
    """An order for the tensors' bytes, and where in a page the first should start, so that as
    many bytes as possible sit at the offset within a page they have in the file they are copied
    from (`phases`; None: written from memory). The kernel copies between different in-page
    offsets ~1.5x slower (BENCHMARKS.md, finalization). Greedy: next, the largest tensor whose
    phase is where the bytes are (one filling whole pages first, which keeps that phase), else
    the smallest one, which moves the phase at the least cost."""
    by_phase: dict[int, int] = {}
    for name, phase in phases.items():
        if phase is not None:
            by_phase[phase] = by_phase.get(phase, 0) + sizes[name]
    if not by_phase:
        return list(sizes), None
    start = max(sorted(by_phase), key=lambda phase: by_phase[phase])
    left, order, at = list(sizes), [], start
    while left:
        fitting = [name for name in left if phases[name] == at]
        whole = [name for name in fitting if sizes[name] % PAGE == 0]
        pick = max(whole or fitting, key=lambda name: sizes[name]) if fitting else min(left, key=lambda name: sizes[name])
        left.remove(pick)
        order.append(pick)
        at = (at + sizes[pick]) % PAGE
    return order, start


def header(tensors: dict, metadata: dict[str, str] | None, order: list[str],
           start: int | None = None) -> tuple[bytes, list[tuple[str, int, int]]]:
    """The safetensors header (names in the dict's order, padded with spaces to 8 bytes, or
    so that the bytes start at `start` within a page) and each tensor's (name, byte size,
    position in the file), its bytes following the header in `order`."""
    entries: dict = {"__metadata__": metadata} if metadata else {}
    offsets, offset = {}, 0
    for name in order:
        offsets[name] = (offset, offset + byte_size(tensors[name]))
        offset = offsets[name][1]
    for name, tensor in tensors.items():
        entries[name] = {"dtype": DTYPES[str(tensor.dtype).removeprefix("torch.")],
                         "shape": list(tensor.shape), "data_offsets": list(offsets[name])}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8 if start is None else (start - 8 - len(text)) % PAGE)
    head = struct.pack("<Q", len(text)) + text
    return head, [(name, last - first, len(head) + first) for name, (first, last) in offsets.items()]


def plan(tensors: dict, metadata: dict[str, str] | None,
         sources: "Sources") -> tuple[bytes, list[tuple[str, int, int, tuple[int, int] | None]]]:
    """The header, and each tensor's (name, byte size, position, where the mapped file holds
    its bytes or None), laid out by `arranged`."""
    sizes = {name: byte_size(tensor) for name, tensor in tensors.items()}
    found = {name: sources.find(tensor.data_ptr(), sizes[name]) for name, tensor in tensors.items()}
    # A header is padded to 8 bytes, so only phases at 8-byte offsets can be met.
    phases = {name: None if where is None or where[1] % 8 else where[1] % PAGE for name, where in found.items()}
    order, start = arranged(sizes, phases)
    head, places = header(tensors, metadata, order, start)
    return head, [(name, size, position, found[name]) for name, size, position in places]


def cpu_contiguous(tensors: dict) -> dict:
    """safetensors.torch.save_file's contract: contiguous CPU tensors, no two sharing memory."""
    tensors = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    if any(tensor.device.type != "cpu" for tensor in tensors.values()):
        raise ValueError("tensors must be on the CPU to be written")
    return tensors


def signature(tensors: dict, metadata: dict[str, str] | None) -> tuple:
    """What decides a file's contents (with the mapped files' bytes)."""
    return metadata, [(name, tensor.dtype, tuple(tensor.shape), tensor.data_ptr()) for name, tensor in tensors.items()]


def save_file(tensors: dict, filename: str, metadata: dict[str, str] | None = None,
              ahead: "CopyAhead | None" = None) -> None:
    """safetensors.torch.save_file; `ahead`: the bytes of a predicted call, copied meanwhile,
    which this call takes over if it is that call (same file, tensors and their memory)."""
    tensors = cpu_contiguous(tensors)
    if ahead is not None and ahead.take(filename, signature(tensors, metadata), tensors):
        return
    sources = Sources()
    out = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        head, places = plan(tensors, metadata, sources)
        _write_at(out, memoryview(head), 0)
        write_tensors(out, tensors, places)
    finally:
        os.close(out)
        sources.close()


def write_tensors(out: int, tensors: dict, places: list, stop: Callable[[], bool] = lambda: False) -> None:
    """Each tensor's bytes at its place: copied from the file that holds them, else from memory;
    `stop()` between tensors ends it early."""
    for name, size, position, found in places:
        if stop():
            return
        if not (found and _copied(found[0], found[1], out, position, size)) and size:
            _write_memory(out, tensors[name], position)


def _write_memory(out: int, tensor, position: int) -> None:
    import torch

    _write_at(out, memoryview(tensor.view(-1).view(torch.uint8).numpy()), position)


class CopyAhead:
    """The file `save_file(tensors, filename, metadata)` would write, planned and its tensors'
    bytes copied on a thread from now on, largest first, while the caller builds what makes the
    real call (the model, `save_pretrained`'s decisions): the copies take the kernel's time, not
    the GIL. A real call for the same file and tensors (names, dtypes, shapes, memory) takes the
    file over (`take`) and rewrites from memory any tensor whose bytes are not (or no longer)
    the mapped file's; any other call writes its file anew."""

    def __init__(self, tensors: dict, filename: str, metadata: dict[str, str] | None = None):
        import threading

        self.tensors = cpu_contiguous(tensors)
        self.filename = filename
        self.signature = signature(self.tensors, metadata)
        self.out: int | None = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.failed: BaseException | None = None
        self.stopping = False  # no call will come for the file: the copies end early
        # Planned here, not on the thread: it is Python, and there it would wait for the GIL
        # while the caller builds the model (49 ms against 8 at ~55M; BENCHMARKS.md).
        self.sources: Sources | None = Sources()
        try:
            self.head, self.places = plan(self.tensors, metadata, self.sources)
        except Exception as error:  # reported by `take`, which then writes the file anew
            self.failed, self.head, self.places = error, b"", []
        self.thread = threading.Thread(target=self._copy, name="copy-ahead", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        if self.failed is not None:
            return
        try:
            write_tensors(self.out, self.tensors, sorted(self.places, key=lambda place: -place[1]),
                          lambda: self.stopping)
        except BaseException as error:  # reported by `take`, which then writes the file anew
            self.failed = error

    def take(self, filename: str, called: tuple, tensors: dict) -> bool:
        """Complete the file if this is its call; False otherwise (a call for this file then
        writes it anew; one for another file ends the guess)."""
        if self.out is None:
            return False
        if filename != self.filename:  # the guess was wrong (shards): stop copying, remove it
            self.close()
            return False
        self.thread.join()
        same = called == self.signature and self.failed is None
        try:
            if same:
                for name, size, position, _ in self.places:
                    if size and self.sources.find(tensors[name].data_ptr(), size) is None:
                        _write_memory(self.out, tensors[name], position)
                _write_at(self.out, memoryview(self.head), 0)  # last: the bytes it describes are in place
        finally:
            self.close(keep=True)  # this call's file, completed here or written anew by the caller
        return same

    def close(self, keep: bool = False) -> None:
        """Done with the file; unless kept, it is removed (no call came for it: no stray file)."""
        self.stopping = not keep
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
    filesystem without support), and the caller writes the bytes itself. The first call stops
    at a STEP boundary of the output: the kernel copies in steps of that size from where a call
    starts, and steps on the boundaries fill its large page-cache folios whole (1.4x faster)."""
    try:
        while size:
            step = -position % STEP or size
            copied = os.copy_file_range(source, out, min(size, step), offset, position)
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
