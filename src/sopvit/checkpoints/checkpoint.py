"""Atomic, versioned training checkpoints.

A checkpoint on disk is always complete: it is written to a temporary file in the same directory,
flushed to the disk, then renamed over the previous one (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sopvit.checkpoints.safe_load import load_torch, read_or_explain

# 2: the optimizer state follows the reference weight-decay rule ([CLS]/position/mask tokens decayed);
# a version-1 optimizer state has other parameter groups and cannot resume under it. Its weights, memories
# and config are the same, so version 1 is still read for export, evaluation and visualisation.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LATEST = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file and why."""


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to the disk, then renamed over it
    (and the rename itself flushed): ``path`` is always the old file or the whole new one. Raises OSError
    after removing the temporary file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically; on failure the previous file at ``path`` is untouched."""
    path = Path(path)
    try:
        write_atomic(path, partial(torch.save, {"format_version": FORMAT_VERSION, **state}))
    except OSError as err:
        reason = err.strerror or str(err)
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}. The previous checkpoint (if any) is intact; "
            "free disk space or fix the output directory's permissions, then resume."
        ) from err


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, checking its format version.

    Raises:
        CheckpointError: the file is missing, damaged, foreign or of another format version.
        UnsafeFileError: the file asks for a type a checkpoint never holds (it could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    # A checkpoint may be downloaded or shared: it is read without running code from it.
    state = read_or_explain(
        partial(load_torch, map_location=map_location),
        path,
        f"checkpoint {path} is unreadable",
        CheckpointError,
    )
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a sopvit training checkpoint (no format_version)")
    version = state["format_version"]
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this sopvit reads versions {readable}"
        )
    return state
