"""Finding and reading a run's checkpoint, whichever format wrote it: ``checkpoint.pt`` (one file, DDP
runs) or the sharded directory ``checkpoint.latest`` names (FSDP runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sopvit.checkpoints.checkpoint import LATEST, CheckpointError, load_checkpoint
from sopvit.checkpoints.sharded import META, POINTER, is_sharded, latest_sharded, read_sharded

# What consumers of a finished run read (export, evaluation, viewing): never the optimizer state.
RUN_PARTS = frozenset({"student", "teacher", "objective"})
INDEX = ".metadata"  # DCP's index of a sharded checkpoint's tensor files
_PARTS = ((INDEX, "the index of its tensor files"), (META, "its step, config and RNG state"))


def sharded_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a whole sharded checkpoint directory (``"has no sopvit.pt (...)"``),
    or None when it is one."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a directory"
    missing = [f"{name} ({what})" for name, what in _PARTS if not (path / name).is_file()]
    return f"has no {' and no '.join(missing)}" if missing else None


def looks_sharded(path: Path) -> bool:
    """Whether ``path`` is a directory holding any part of a sharded checkpoint, whole or not."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any((path / name).is_file() for name, _ in _PARTS) or any(path.glob("*.distcp"))


def _pointed(run_dir: Path) -> Path | None:
    """The directory ``checkpoint.latest`` names, or None without one; a clear error when it is not whole."""
    pointer = run_dir / POINTER
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    edited = "the run directory was edited by hand or copied in part"
    if not name:
        raise CheckpointError(f"{pointer} is empty instead of naming a checkpoint-NNNNNN directory: {edited}")
    problem = sharded_problem(run_dir / name)
    if problem is not None:
        raise CheckpointError(f"{pointer} names {name}, which {problem}: {edited}")
    return latest_sharded(run_dir)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest checkpoint, or None. A save in one format removes the other; both are present
    only when a run was cut between the two, and then the newer wins.

    Raises:
        CheckpointError: ``checkpoint.latest`` is empty or names a directory that is missing or incomplete.
    """
    run_dir = Path(run_dir)
    file = run_dir / LATEST
    sharded = _pointed(run_dir)
    if sharded is None:
        return file if file.is_file() else None
    if file.is_file() and file.stat().st_mtime > (run_dir / POINTER).stat().st_mtime:
        return file
    return sharded


def is_run_dir(path: Path) -> bool:
    return Path(path).is_dir() and ((Path(path) / LATEST).is_file() or (Path(path) / POINTER).is_file())


def checkpoint_path(source: str | Path) -> Path:
    """The checkpoint of a run directory, or ``source`` itself (a checkpoint file or sharded directory;
    the ``sopvit.pt`` inside one stands for its directory).

    Raises:
        FileNotFoundError: ``source`` is missing, or a directory with no checkpoint.
        CheckpointError: ``source`` is (or its ``checkpoint.latest`` names) an incomplete sharded directory.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file() and path.name == META and is_sharded(path.parent):
        return path.parent
    if not path.is_dir() or is_sharded(path):
        return path
    if looks_sharded(path) and not is_run_dir(path):
        raise CheckpointError(
            f"{path} is an incomplete sharded checkpoint: it {sharded_problem(path)}. It was copied in part, "
            "or it is the temporary directory of a save that was cut short; pass the run directory instead"
        )
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"{source} is a directory without a {LATEST} or {POINTER} (not a sopvit run directory)"
        )
    return found


def read_checkpoint(path: Path, parts: frozenset[str] = RUN_PARTS) -> dict[str, Any]:
    """A checkpoint as one dict of whole tensors: a file as written; a sharded directory's ``parts``
    gathered in this process, beside its step, config and RNG.

    Raises:
        CheckpointError: missing, incomplete, damaged or of another format version.
        UnsafeFileError: the file or directory asks for a type a checkpoint never holds (it could run code).
    """
    path = Path(path)
    if not path.is_dir():
        return load_checkpoint(path)
    problem = sharded_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a whole sharded checkpoint: it {problem}")
    return read_sharded(path, set(parts))
