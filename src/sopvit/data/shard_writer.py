"""Packs an image folder into WebDataset-layout tar shards that read back as exactly the same data set.

Pre-training seeds every image's augmentation by its data-set index, so shards only give the folder's
batches if item ``i`` of the shards is item ``i`` of ``ImageFolderDataset``: images are packed in that
order, keyed by their zero-padded index, with the folder's class index as ``KEY.cls``. The bytes are
stored unchanged (no re-encode), so decoding gives the same pixels, and a bad file stays bad (it is
skipped at the same index). A pack of a million images takes a while: each shard is written under a
temporary name and renamed when complete, so a rerun after an interruption keeps the finished shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

from sopvit.data.image_folder import ImageFolderDataset
from sopvit.data.shard_index import MANIFEST, load_index

__all__ = ["WriteResult", "write_shards"]

logger = logging.getLogger(__name__)

_KEY_DIGITS = 9  # keys are global image indices: up to a billion images


@dataclass(frozen=True)
class WriteResult:
    out_dir: str
    images: int
    shards: int
    written: int  # shards written by this call
    reused: int  # complete shards an earlier, interrupted call had written
    pattern: str  # the data.path that reads them back


def _member_names(folder: ImageFolderDataset, index: int) -> list[str]:
    """The tar members of image ``index``: the image under its (lower-cased) extension, then its label."""
    key = str(index).zfill(_KEY_DIGITS)
    ext = os.path.splitext(folder.paths[index])[1].lower()
    return [key + ext, *([f"{key}.cls"] if folder.classes else [])]


def _plan(folder: ImageFolderDataset, src: str, per_shard: int, prefix: str) -> dict[str, Any]:
    """The manifest: what the shards hold, enough to tell a rerun of the same pack from another."""
    n = len(folder)
    count = -(-n // per_shard)
    digits = max(6, len(str(count - 1)))
    listing = hashlib.sha256()
    for path, label in zip(folder.paths, folder.labels, strict=True):
        listing.update(f"{os.path.relpath(path, folder.root)}\0{label}\n".encode())
    return {
        "format": "sopvit-shards",
        "version": 1,
        "source": os.path.abspath(src),
        "listing_sha256": listing.hexdigest(),
        "count": n,
        "per_shard": per_shard,
        "prefix": prefix,
        "shards": count,
        "classes": folder.classes,
        "pattern": f"{prefix}-{{{'0' * digits}..{str(count - 1).zfill(digits)}}}.tar",
        "_digits": digits,
    }


def _check_out_dir(out_dir: str, plan: dict[str, Any]) -> None:
    """Refuses a folder holding shards of another pack (source, listing or per_shard differ)."""
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                old = json.load(f)
        except ValueError:
            raise ValueError(f"{manifest!r} is not valid JSON; delete it or write to a new folder") from None
        fields = ("source", "listing_sha256", "per_shard", "prefix")
        if not isinstance(old, dict) or any(old.get(k) != plan[k] for k in fields):
            was = f"{old.get('source')!r}, per_shard={old.get('per_shard')}" if isinstance(old, dict) else "?"
            raise ValueError(
                f"{out_dir!r} holds shards of another pack ({was}; the source's files may have changed "
                "since); write to a new folder or delete it"
            )
    elif os.path.isdir(out_dir) and any(
        e.name.startswith(f"{plan['prefix']}-") and e.name.endswith(".tar") for e in os.scandir(out_dir)
    ):
        raise ValueError(
            f"{out_dir!r} holds {plan['prefix']}-*.tar shards without a {MANIFEST}; use a new folder"
        )


def _is_complete(shard: str, expected: list[str]) -> bool:
    """Whether ``shard`` holds exactly the ``expected`` members, all of them whole."""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            members = tar.getmembers()
        end = max((m.offset_data + m.size for m in members), default=0)
        return [m.name for m in members] == expected and end <= os.path.getsize(shard)
    except (OSError, tarfile.TarError):
        return False


def _read_source(path: str) -> bytes:
    """The file's bytes; an unreadable file is packed empty, so it stays bad at the same index."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        warnings.warn(f"packing unreadable image {path!r} as empty ({exc})", RuntimeWarning, stacklevel=3)
        return b""


def _write_shard(folder: ImageFolderDataset, indices: range, final: str) -> None:
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp")
    # USTAR with fixed owner and times: a rerun writes byte-identical shards.
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in indices:
            names = _member_names(folder, i)
            payloads = [
                _read_source(folder.paths[i]),
                *([str(folder.labels[i]).encode()] if len(names) > 1 else []),
            ]
            for name, data in zip(names, payloads, strict=True):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, final)  # the shard appears complete or not at all


def _save_manifest(out_dir: str, plan: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({k: v for k, v in plan.items() if not k.startswith("_")}, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))


def write_shards(
    src: str | os.PathLike[str], out_dir: str | os.PathLike[str], per_shard: int = 1000, prefix: str = "shard"
) -> WriteResult:
    """Packs the images of ``src`` (ImageFolderDataset order and labels) into ``out_dir/PREFIX-NNNNNN.tar``.

    Writes each shard's index beside it and ``out_dir/shards.json`` (count, per_shard, classes and the
    brace ``pattern``). Rerunning after an interruption rewrites only incomplete shards; an ``out_dir``
    holding another pack is refused.
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    if not prefix or os.sep in prefix or prefix.startswith("."):
        raise ValueError(f"prefix must be a plain file name prefix, got {prefix!r}")
    src, out_dir = os.fspath(src), os.fspath(out_dir)
    folder = ImageFolderDataset(src, labelled=None)
    plan = _plan(folder, src, per_shard, prefix)
    _check_out_dir(out_dir, plan)
    os.makedirs(out_dir, exist_ok=True)
    _save_manifest(out_dir, plan)  # first, so that an interrupted pack is recognised by its rerun
    written = reused = 0
    n = len(folder)
    for s in range(plan["shards"]):
        indices = range(s * per_shard, min(n, (s + 1) * per_shard))
        final = os.path.join(out_dir, f"{prefix}-{str(s).zfill(plan['_digits'])}.tar")
        expected = [name for i in indices for name in _member_names(folder, i)]
        if _is_complete(final, expected):
            reused += 1
        else:
            _write_shard(folder, indices, final)
            written += 1
            logger.info("wrote %s (%d images)", final, len(indices))
        load_index(final)  # builds and caches the index where it is missing
    return WriteResult(out_dir, n, plan["shards"], written, reused, os.path.join(out_dir, plan["pattern"]))
