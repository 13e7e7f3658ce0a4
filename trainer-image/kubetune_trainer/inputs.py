"""Pre-flight reachability checks of inputs that only later steps read (`validateInputs`).

The data is always read and validated by `prepare`; these make a wrong `customWeightsPath`
fail there too, on a CPU pod, instead of after the GPUs were granted.
"""

from __future__ import annotations

import fsspec

from .checkpoints import SHARD_SUFFIXES
from .errors import TransientError, UserError


def check_custom_weights(path: str | None) -> None:
    """A Composer checkpoint file, a `latest-*` pointer, or a folder of `.distcp` shards."""
    if not path:
        return
    try:
        fs, root = fsspec.core.url_to_fs(path)
        if not fs.exists(root):
            raise UserError(f"customWeightsPath {path}: no such file or folder", "CustomWeightsMissing")
        if fs.isdir(root) and not any(name.endswith(SHARD_SUFFIXES) for name in fs.ls(root, detail=False)):
            raise UserError(f"customWeightsPath {path}: a folder, but without sharded checkpoint "
                            "files (.distcp)", "CustomWeightsInvalid")
    except (ImportError, ValueError) as error:  # no filesystem for that scheme
        raise UserError(f"customWeightsPath {path}: unsupported location: {error}", "CustomWeightsInvalid") from error
    except OSError as error:  # a store that did not answer: worth another try
        raise TransientError(f"customWeightsPath {path}: unreachable: {error}", "InputUnreachable") from error
