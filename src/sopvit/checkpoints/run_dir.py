"""Finding and reading a run's checkpoint, whichever format wrote it: ``checkpoint.pt`` (one file, DDP
runs) or the sharded directory ``checkpoint.latest`` names (FSDP runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sopvit.checkpoints.checkpoint import LATEST, load_checkpoint
from sopvit.checkpoints.sharded import POINTER, is_sharded, latest_sharded, read_sharded

# What consumers of a finished run read (export, evaluation, viewing): never the optimizer state.
RUN_PARTS = frozenset({"student", "teacher", "objective"})


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest checkpoint, or None. A save in one format removes the other; both are present
    only when a run was cut between the two, and then the newer wins."""
    run_dir = Path(run_dir)
    file = run_dir / LATEST
    sharded = latest_sharded(run_dir)
    if sharded is None:
        return file if file.is_file() else None
    if file.is_file() and file.stat().st_mtime > (run_dir / POINTER).stat().st_mtime:
        return file
    return sharded


def is_run_dir(path: Path) -> bool:
    return Path(path).is_dir() and ((Path(path) / LATEST).is_file() or (Path(path) / POINTER).is_file())


def checkpoint_path(source: str | Path) -> Path:
    """The checkpoint of a run directory, or ``source`` itself (a checkpoint file or sharded directory).

    Raises:
        FileNotFoundError: ``source`` is missing, or a directory with no checkpoint.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir() or is_sharded(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"{source} is a directory without a {LATEST} or {POINTER} (not a sopvit run directory)"
        )
    return found


def read_checkpoint(path: Path, parts: frozenset[str] = RUN_PARTS) -> dict[str, Any]:
    """A checkpoint as one dict of whole tensors: a file as written; a sharded directory's ``parts``
    gathered in this process, beside its step, config and RNG."""
    path = Path(path)
    if path.is_dir():
        return read_sharded(path, set(parts))
    return load_checkpoint(path)
