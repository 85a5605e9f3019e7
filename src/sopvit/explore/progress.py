"""Where an embedding run writes, what it can resume, and how a finished table takes its place.

A run builds its table in ``OUT.partial`` and renames it to ``OUT`` only when every part is there, so a
table read at ``OUT`` is always whole, also while ``--overwrite`` replaces an older one (the old folder is
moved aside, the new one moved in, then the old one deleted). ``_progress.json`` records what the run
computes (the backbone's fingerprint, the feature, the image list, the part size and the rank count); a
rerun with the same record keeps the part files already written and computes the missing ones, any other
run is refused unless ``--overwrite``. Files starting with ``_`` or ``.`` are skipped by pyarrow (and so
pandas) when they read the folder, which therefore stays a plain Parquet data set.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sopvit.explore.table import EmbeddingsError, TableMeta, read_meta

PROGRESS = "_progress.json"
UNREADABLE = "_unreadable.txt"
PARTIAL, REPLACED = ".partial", ".replaced"


def part_name(rank: int, index: int) -> str:
    return f"part-{rank:03d}-{index:05d}.parquet"


def bad_name(rank: int, index: int) -> str:
    """The unreadable images of one part: kept beside it, so a resumed run still lists them."""
    return f"_unreadable-{rank:03d}-{index:05d}.tsv"


@dataclass(frozen=True)
class Plan:
    """What one embedding run computes; two runs with equal plans write the same table."""

    meta: TableMeta
    data: str  # the absolute folder or shard pattern
    images: int
    listing: str  # sha256 of the image paths and labels: a folder that changed is another data set
    part_size: int
    world_size: int

    def record(self) -> dict[str, Any]:
        meta = {k: v for k, v in self.meta.__dict__.items() if k != "source"}  # a moved run is the same run
        fields = ("data", "images", "listing", "part_size", "world_size")
        return {**meta, **{k: getattr(self, k) for k in fields}}

    def parts(self, rank: int) -> int:
        share = len(range(rank, self.images, self.world_size))
        return -(-share // self.part_size)

    def all_parts(self) -> list[tuple[int, int]]:
        return [(r, j) for r in range(self.world_size) for j in range(self.parts(r))]


def _read_progress(folder: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((folder / PROGRESS).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _differences(mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    keys = [k for k in mine if mine[k] != theirs.get(k)]
    return ", ".join(f"{k} {theirs.get(k)!r} there, {mine[k]!r} now" for k in keys[:4])


def _refuse(folder: Path, plan: Plan, what: str) -> None:
    """The one-line refusal to mix this run into ``folder``, naming what differs."""
    theirs = (_read_progress(folder) or {}).get("plan")
    if isinstance(theirs, dict):
        detail = _differences(plan.record(), theirs)
    else:
        detail = f"{read_meta(folder).describe()}, without a progress record"
    raise EmbeddingsError(
        f"{folder} holds {what} ({detail}): pass --overwrite to replace it, or choose another --out"
    )


def _is_ours(path: Path) -> bool:
    """A table (or one of our runs' folders): what --overwrite may replace."""
    if path.is_dir() and _read_progress(path) is not None:
        return True
    try:
        read_meta(path)
    except EmbeddingsError:
        return False
    return True


def choose_folder(out: Path, plan: Plan, overwrite: bool) -> Path:
    """The folder to write parts into: ``out`` itself when it holds this very run (a finished table whose
    missing parts are rewritten), else ``out.partial``. Read-only, so every rank can call it."""
    mine = plan.record()
    if (out.exists() or out.is_symlink()) and not (out.is_dir() and not any(out.iterdir())):
        if out.is_dir() and (_read_progress(out) or {}).get("plan") == mine:
            return out
        if not _is_ours(out):  # never deleted, not even under --overwrite: it may be anything
            raise EmbeddingsError(f"--out {out} exists and is not an embeddings table: choose another --out")
        if not overwrite:
            _refuse(out, plan, "embeddings of another run")
    partial = out.with_name(out.name + PARTIAL)
    if partial.exists() and (_read_progress(partial) or {}).get("plan") != mine:
        started = partial.is_dir() and not any(partial.iterdir())  # stopped before its progress record
        if _read_progress(partial) is None and not started:  # not left by a run of ours: not ours to empty
            raise EmbeddingsError(f"{partial} exists and is not an interrupted sopvit embed: move it away")
        if not overwrite:
            _refuse(partial, plan, "an interrupted run with other settings")
    return partial


def prepare(folder: Path, plan: Plan) -> None:
    """Start (or keep) ``folder`` for ``plan``: a folder of another plan is emptied first (rank 0 only)."""
    progress = _read_progress(folder)
    if folder.exists() and (progress is None or progress.get("plan") != plan.record()):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if progress is None or progress.get("plan") != plan.record():
        _write_json(folder / PROGRESS, {"plan": plan.record(), "complete": False})


def missing_parts(folder: Path, plan: Plan, rank: int) -> list[int]:
    return [j for j in range(plan.parts(rank)) if not (folder / part_name(rank, j)).is_file()]


def write_bad(folder: Path, rank: int, index: int, bad: list[tuple[int, str, str]]) -> None:
    """Record (or clear) a part's unreadable images before the part itself is written."""
    path = folder / bad_name(rank, index)
    if not bad:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{i}\t{p}\t{reason}\n" for i, p, reason in bad))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Summary:
    rows: int
    unreadable: int


def finalize(folder: Path, out: Path, plan: Plan) -> Summary:
    """Check every part is there, list the unreadable images, and put the table at ``out`` (rank 0)."""
    missing = [part_name(r, j) for r, j in plan.all_parts() if not (folder / part_name(r, j)).is_file()]
    if missing:
        raise EmbeddingsError(f"{folder} lacks {len(missing)} part(s), e.g. {missing[0]}: rerun the command")
    rows = sum(pq.read_metadata(folder / part_name(r, j)).num_rows for r, j in plan.all_parts())
    bad: list[tuple[int, str]] = []
    for r, j in plan.all_parts():
        path = folder / bad_name(r, j)
        if path.is_file():
            for line in path.read_text().splitlines():
                index, name, reason = line.split("\t", 2)
                bad.append((int(index), f"{name}\t{reason}"))
    listing = folder / UNREADABLE
    listing.unlink(missing_ok=True)
    if bad:
        listing.write_text("".join(f"{line}\n" for _, line in sorted(bad)))
    for stray in folder.glob(".*.tmp-*"):  # temporary files of an interrupted write
        stray.unlink(missing_ok=True)
    _write_json(
        folder / PROGRESS, {"plan": plan.record(), "complete": True, "rows": rows, "unreadable": len(bad)}
    )
    if folder != out:
        _move_into_place(folder, out)
    return Summary(rows, len(bad))


def _move_into_place(folder: Path, out: Path) -> None:
    old = out.with_name(out.name + REPLACED)
    _remove(old)  # left by a run stopped between the two renames below
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(folder, out)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
