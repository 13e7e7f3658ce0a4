"""`cleanup --work-dir DIR`: remove a deleted run's files from its storage.

The operator runs it in a Job when a TrainingRun is deleted (unless it is annotated to keep its
storage), so a run of the same name later starts afresh instead of resuming the old one's data
and checkpoints. The folder (or object-store prefix) is the run's own work_dir,
`<storage root>/<namespace>/<run>`; nothing outside it is touched. Removing what is already gone
is done.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .config import is_object_store
from .errors import UserError

log = logging.getLogger(__name__)


def run_cleanup(work_dir: str) -> dict:
    if not work_dir.strip("/") or "/" not in work_dir.strip("/"):
        raise UserError(f"cleanup refuses {work_dir!r}: not a run's folder <root>/<namespace>/<run>",
                        "InvalidInput")
    if is_object_store(work_dir):
        removed = _remove_prefix(work_dir)
    else:
        removed = _remove_folder(Path(work_dir))
    log.info("removed %d files of %s", removed, work_dir)
    return {"removed": work_dir, "files": removed}


def _remove_folder(folder: Path) -> int:
    if not folder.exists():
        return 0
    count = sum(1 for path in folder.rglob("*") if not path.is_dir())
    shutil.rmtree(folder)
    return count


def _remove_prefix(uri: str) -> int:
    import fsspec

    from .storage import storage_errors

    with storage_errors(uri):
        fs, root = fsspec.core.url_to_fs(uri.rstrip("/"))
        found = fs.find(root)
        if found:
            fs.rm(found)
        return len(found)
