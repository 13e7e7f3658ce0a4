"""A run's work_dir on an object store, mirrored through a local staging folder.

The steps read and write plain local files (memory-mapped arrays, Composer checkpoints, a
`transformers` folder), so a work_dir on a PVC is used in place. When it is an object-store URI
(`s3://bucket/prefix`, or any fsspec protocol whose package is installed) each step runs on a
local staging copy instead: what the step reads is pulled before it starts, what it writes is
pushed after it ends (checkpoints as soon as each is saved, by the trainer), and completion
markers go last, so a half-pushed folder never looks done. Object stores have no symlinks: a
`latest-*` link travels as Composer's `<link>.symlink` object holding its target's name.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import checkpoints
from .checkpoints import LATEST_PATH, POINTER_SUFFIX
from .config import RunConfig, is_object_store
from .contract import DATA_MARKER, ENV_RANK, ENV_SCRATCH_DIR, HF_MARKER
from .errors import TransientError, UserError

log = logging.getLogger(__name__)

# What each step reads (pointers are followed and their targets pulled) and writes.
POINTERS = {"train": (LATEST_PATH,), "convert": (LATEST_PATH,), "finalize": (LATEST_PATH,)}
PULLS = {"prepare": (f"data/{DATA_MARKER}",), "train": ("data", "result"), "convert": ("hf",),
         "register": ("hf", "result"), "finalize": ("hf", "result")}
PUSHES = {"prepare": ("data",), "train": ("checkpoints", "result"), "convert": ("hf",),
          "register": ("result",), "finalize": ("hf", "result")}
MARKERS = (f"data/{DATA_MARKER}", f"hf/{HF_MARKER}")


class Mirror:
    """An object-store folder and its local copy, synchronised file by file (by size)."""

    def __init__(self, remote: str, local: Path):
        import fsspec

        self.remote = remote.rstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        self.local = local.resolve()
        try:
            self.fs, root = fsspec.core.url_to_fs(self.remote)
        except (ImportError, ValueError) as error:  # an unknown protocol or its package missing
            raise UserError(f"storage {self.remote}: {error}", "StorageUnsupported") from error
        self.root = root.rstrip("/")

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._remote(rel))

    def remote_files(self, rel: str) -> dict[str, int]:
        """Relative name -> size of every object at `rel` (one object, or all under a prefix)."""
        found = self.fs.find(self._remote(rel), detail=True)
        files = {}
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            size = info.get("size")
            files[path[len(self.root):].lstrip("/")] = int(size if size is not None else self.fs.size(path))
        return files

    def pull(self, rel: str) -> int:
        """Copy `rel` (an object or a prefix) down where missing locally or of another size."""
        wanted = [name for name, size in self.remote_files(rel).items() if not self._local_has(name, size)]
        for name in wanted:
            (self.local / name).parent.mkdir(parents=True, exist_ok=True)
        if wanted:
            self.fs.get([self._remote(n) for n in wanted], [str(self.local / n) for n in wanted])
            log.info("pulled %d file(s) of %s from %s", len(wanted), rel, self.remote)
        return len(wanted)

    def push(self, rel: str) -> int:
        """Copy local `rel` (a file or folder) up where missing remotely or of another size.
        Symlinks are skipped (see push_pointer); completion markers go after everything else."""
        names = self._local_files(rel)
        if not names:
            return 0
        remote = self.remote_files(rel)
        changed = [n for n in names if remote.get(n) != (self.local / n).stat().st_size]
        for batch in ([n for n in changed if n not in MARKERS], [n for n in changed if n in MARKERS]):
            if batch:
                self.fs.put([str(self.local / n) for n in batch], [self._remote(n) for n in batch])
        if changed:
            log.info("pushed %d file(s) of %s to %s", len(changed), rel, self.remote)
        return len(changed)

    def push_pointer(self, link: str) -> str | None:
        """Publish the local symlink `link` as `<link>.symlink` naming its target; the target."""
        path = self.local / link
        if not path.is_symlink():
            return None
        target = os.path.relpath(path.resolve(), path.parent.resolve())
        self.fs.pipe_file(self._remote(link + POINTER_SUFFIX), target.encode())
        return target

    def pull_pointer(self, link: str) -> str | None:
        """Pull what the remote `<link>.symlink` names and point the local `link` at it."""
        path = self.local / link
        if path.is_symlink():
            path.unlink()  # the object store is the truth, not what a previous process left here
        pointer = self._remote(link + POINTER_SUFFIX)
        if not self.fs.exists(pointer):
            return None
        target = self.fs.cat_file(pointer).decode().strip()
        if not target or Path(target).is_absolute() or ".." in Path(target).parts:
            raise UserError(f"storage {self.remote}/{link}{POINTER_SUFFIX}: names {target!r}, "
                            "not a checkpoint beside it", "CheckpointPointerInvalid")
        if not self.pull(str(Path(link).parent / target)):
            self.fs.info(self._remote(str(Path(link).parent / target)))  # gone: FileNotFoundError
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
        return target

    def _local_has(self, name: str, size: int) -> bool:
        path = self.local / name
        return path.is_file() and not path.is_symlink() and path.stat().st_size == size

    def _local_files(self, rel: str) -> list[str]:
        """Regular files at local `rel`; links, and folders reached through links, are left out."""
        top = self.local / rel
        if top.is_symlink() or not top.exists():
            return []
        if top.is_file():
            return [rel]
        return sorted(str((Path(folder) / name).relative_to(self.local))
                      for folder, _, names in os.walk(top)  # does not descend into linked folders
                      for name in names if not (Path(folder) / name).is_symlink())


def stage_dir(remote: str, base: str | None = None) -> Path:
    """The node's staging folder for one remote work_dir, shared by the processes of a pod."""
    base = base or os.environ.get(ENV_SCRATCH_DIR) or str(Path(tempfile.gettempdir()) / "kubetune-stage")
    return Path(base) / hashlib.sha256(remote.encode()).hexdigest()[:16]


@contextmanager
def node_lock(folder: Path) -> Iterator[None]:
    """One process of a pod pulls at a time; the others then find the files already there."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextmanager
def storage_errors(remote: str) -> Iterator[None]:
    """Object-store trouble as step errors: access and missing buckets are the user's to fix,
    anything else (network, throttling) may pass on a retry."""
    try:
        yield
    except (UserError, TransientError):
        raise
    except PermissionError as error:
        raise UserError(f"storage {remote}: access denied ({error})", "StorageAccessDenied") from error
    except FileNotFoundError as error:
        raise UserError(f"storage {remote}: not found ({error})", "StorageNotFound") from error
    except OSError as error:
        raise TransientError(f"storage {remote}: {error}", "StorageUnavailable") from error


@contextmanager
def staged(step: str, config: RunConfig) -> Iterator[RunConfig]:
    """Run `step` on a local copy of an object-store work_dir: yields the config to run with
    (its `published` maps staged paths back to URIs). Outputs are pushed only when the step
    succeeds; a mounted work_dir passes through untouched."""
    if step == "train":
        config = with_local_custom_weights(config)
    if not is_object_store(config.work_dir):
        yield config
        return
    with storage_errors(config.work_dir):
        mirror = Mirror(config.work_dir, stage_dir(config.work_dir))
        with node_lock(mirror.local):
            for link in POINTERS.get(step, ()):
                target = mirror.pull_pointer(link)
                if step == "train":
                    pull_fallbacks(mirror, target)
            for rel in PULLS[step]:
                mirror.pull(rel)
    yield local_config(config, mirror)
    with storage_errors(config.work_dir):
        for rel in PUSHES[step]:
            mirror.push(rel)
        if step == "train" and os.environ.get(ENV_RANK, "0") == "0":
            mirror.push_pointer(LATEST_PATH)


def pull_fallbacks(mirror: Mirror, latest: str | None) -> None:
    """While the newest checkpoint pulled is not whole (a save cut short), pull the one before it:
    the resume then falls back past a corrupt latest as it does on a mounted volume."""
    folder, newest = mirror.local / checkpoints.FOLDER, latest
    names = None
    while newest is not None and checkpoints.defect(folder / newest) is not None:
        if names is None:  # listed only when needed: most resumes find the latest whole
            names = [rel.split("/")[1] for rel in mirror.remote_files(checkpoints.FOLDER)]
        before = checkpoints.older(names, newest)
        newest = before[0] if before else None
        if newest is not None:
            mirror.pull(f"{checkpoints.FOLDER}/{newest}")


def local_config(config: RunConfig, mirror: Mirror) -> RunConfig:
    return config.model_copy(update={"work_dir": str(mirror.local), "remote_work_dir": mirror.remote})


def with_local_custom_weights(config: RunConfig) -> RunConfig:
    """An object-store customWeightsPath (a checkpoint file, a `.symlink` pointer, a folder of
    shards) pulled into this pod's staging area; the config names the local copy instead."""
    uri = config.custom_weights_path
    if not uri or not is_object_store(uri):
        return config
    folder, name = uri.rstrip("/").rsplit("/", 1)
    try:
        with storage_errors(uri):
            mirror = Mirror(folder, stage_dir(folder))
            with node_lock(mirror.local):
                if name.endswith(POINTER_SUFFIX):  # Composer's pointer: fetch what it names
                    target = mirror.pull_pointer(name.removesuffix(POINTER_SUFFIX))
                    local = mirror.local / target if target else None
                else:
                    local = mirror.local / name if mirror.pull(name) or (mirror.local / name).exists() else None
    except UserError as error:
        raise UserError(f"customWeightsPath {error.message}", "CustomWeightsMissing") from error
    if local is None:
        raise UserError(f"customWeightsPath {uri}: no such object", "CustomWeightsMissing")
    log.info("customWeightsPath %s staged at %s", uri, local)
    return config.model_copy(update={"custom_weights_path": str(local)})
