"""Sharded training checkpoints: one ``torch.distributed.checkpoint`` (DCP) directory per save.

In a run directory::

    checkpoint-000120/     .metadata, one __R_0.distcp per rank, and sopvit.pt (step, config, every
                           rank's RNG: what is not a tensor, in the single-file checkpoint's format)
    checkpoint.latest      the name of the newest complete directory

A save is written into ``.checkpoint-000120.tmp-dcp``, renamed once every rank has written its part, and
only then named in ``checkpoint.latest`` (replaced atomically); older directories are removed last. A save
cut short therefore leaves the previous checkpoint named and whole. DCP reshards on load: a run saved on
N ranks continues on M.

DCP reads its index with a bare ``pickle.load`` and non-tensor entries with ``torch.load(weights_only=
False)``; both are replaced here by readers that know only what a checkpoint holds, since a run directory
may come from anyone.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from sopvit import distributed as dist
from sopvit.checkpoints.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_atomic
from sopvit.checkpoints.safe_load import UnsafeFileError, refusal_or_reason, safe_torch_globals

POINTER = "checkpoint.latest"
META = "sopvit.pt"
_PREFIX = "checkpoint-"
_TMP_SUFFIX = ".tmp-dcp"


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    # DCP warns on every single-process save or load, which is how a one-process run is meant to use it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def sharded_name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (``.metadata`` and ``sopvit.pt`` inside)."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / META).is_file()


def latest_sharded(run_dir: Path) -> Path | None:
    """The directory ``checkpoint.latest`` names, or None when the run has no sharded checkpoint."""
    pointer = Path(run_dir) / POINTER
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not is_sharded(path):
        raise CheckpointError(
            f"{pointer} names {path.name}, which is missing or incomplete: the run directory was edited "
            "by hand or copied in part"
        )
    return path


def save_sharded(tensors: dict[str, Any], meta: dict[str, Any], run_dir: Path, step: int) -> Path:
    """Every rank writes its shards of ``tensors``; rank 0 adds ``meta`` and publishes the directory.

    A collective: every rank calls it with the same ``step``. Returns the published directory.
    """
    run_dir = Path(run_dir)
    final = run_dir / sharded_name(step)
    tmp = run_dir / f".{final.name}{_TMP_SUFFIX}"
    try:
        if dist.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        with _single_process_quiet():
            dcp.save(tensors, checkpoint_id=tmp, no_dist=not dist.is_distributed())
        dist.barrier()
        if dist.is_main_process():
            save_checkpoint(meta, tmp / META)
            if final.exists():  # the same step saved again: moved aside, removed once replaced
                os.replace(final, run_dir / f".{final.name}.old{_TMP_SUFFIX}")
            os.replace(tmp, final)
            write_atomic(run_dir / POINTER, lambda f: f.write(final.name.encode()))
            for old in [*run_dir.glob(f"{_PREFIX}*"), *run_dir.glob(f".{final.name}.old{_TMP_SUFFIX}")]:
                if old.is_dir() and old != final:
                    shutil.rmtree(old, ignore_errors=True)
            (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # a single file from a ddp stretch
    except (OSError, CheckpointException) as err:
        # DCP wraps a rank's failure (a BaseException holding every rank's traceback); name the first.
        cause = (
            next((e for e, _ in err.failures.values()), err) if isinstance(err, CheckpointException) else err
        )
        reason = getattr(cause, "strerror", None) or cause
        raise CheckpointError(
            f"could not write sharded checkpoint {final}: {reason}. The previous checkpoint (if any) is "
            "intact; free disk space or fix the output directory's permissions, then resume."
        ) from err
    dist.barrier()
    return final


def remove_sharded(run_dir: Path) -> None:
    """Forget sharded checkpoints once a single-file checkpoint has replaced them (rank 0 only)."""
    (Path(run_dir) / POINTER).unlink(missing_ok=True)
    for old in Path(run_dir).glob(f"{_PREFIX}*"):
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def remove_stale(run_dir: Path) -> None:
    """Remove directories of saves cut short (rank 0, before a run starts)."""
    for stale in Path(run_dir).glob(f".{_PREFIX}*{_TMP_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------------------ safe reading
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch", "Size"): torch.Size,
    ("pathlib", "PosixPath"): Path,
    ("pathlib", "WindowsPath"): Path,
    ("pathlib", "Path"): Path,
}


class _Refused(pickle.UnpicklingError):
    """The index asks for a global outside the allowlist (a damaged index raises other errors)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _METADATA_CLASSES.get((module, name))
        if found is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    text = " ".join(str(err).split())
    reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return CheckpointError(
        f"sharded checkpoint {path} is unreadable ({reason}): it is damaged or was copied in part"
    )


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except _Refused as err:
            raise UnsafeFileError(
                f"refusing to load {path}: it asks for {err}, which a checkpoint index never holds and "
                "which could run code (the directory may be malicious)"
            ) from err
        except Exception as err:  # truncated, not a pickle, missing
            raise _unreadable(path, err) from err
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    source = Path()  # the checkpoint read, for messages

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            with safe_torch_globals():
                loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise refusal_or_reason(self.source, err) from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class _SafeEmptyPlanner(_EmptyStateDictLoadPlanner):
    source = Path()
    load_bytes = _SafePlanner.load_bytes


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """One-line errors for whatever reading ``path`` raises. DCP wraps every rank's exception, with its
    traceback, in a ``CheckpointException``, a ``BaseException`` that no ``except Exception`` catches."""
    try:
        yield
    except (UnsafeFileError, CheckpointError):
        raise
    except CheckpointException as err:
        cause = next((exc for exc, _ in err.failures.values()), err)
        if isinstance(cause, UnsafeFileError | CheckpointError):
            raise cause from err
        raise _unreadable(path, cause) from err
    except Exception as err:
        raise _unreadable(path, err) from err


def read_meta(path: Path) -> dict[str, Any]:
    """The non-tensor part (step, config, RNG, format version) of a sharded checkpoint directory."""
    return load_checkpoint(Path(path) / META)


def load_sharded(state: dict[str, Any], path: Path) -> None:
    """Fill ``state`` (tensors shaped and placed as this run holds them, local shards under FSDP) in place
    from the checkpoint at ``path``, resharding as needed. A collective under a process group."""
    planner = _SafePlanner()
    planner.source = Path(path)
    with _reading(path), _single_process_quiet():
        reader, single = _SafeReader(path), not dist.is_distributed()
        reader.read_metadata()  # first, alone: DCP would retry a refused index as a per-rank one
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=single)


def read_sharded(path: Path, parts: set[str]) -> dict[str, Any]:
    """The checkpoint's ``parts`` (e.g. ``{"teacher", "objective"}``) gathered into whole tensors in this
    process, with its metadata, shaped like a single-file checkpoint (for export, evaluation, viewing)."""
    path = Path(path)
    state = read_meta(path)
    tensors: dict[str, Any] = {}
    planner = _SafeEmptyPlanner(keys=parts)
    planner.source = path
    with _reading(path):
        reader = _SafeReader(path)
        reader.read_metadata()  # first, alone: DCP would retry a refused index as a per-rank one
        # The loader itself: dcp.load fills a copy of the dict it is given, and this one starts empty.
        _load_state_dict(tensors, reader, no_dist=True, planner=planner)
    return {**state, **tensors}


def saved_keys(path: Path) -> set[str]:
    """The flattened keys (``optimizer.state.<name>.exp_avg``, ...) a sharded checkpoint holds."""
    with _reading(path):
        return set(_SafeReader(path).read_metadata().state_dict_metadata)
