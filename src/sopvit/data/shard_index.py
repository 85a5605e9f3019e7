"""Where each image lies inside a tar shard: the index of member byte ranges, built once and cached.

Random access to a tar needs the byte range of every member, which only a scan of all headers gives; a
scan costs one read per member, so it is done once and cached as JSON beside the shard
(``SHARD.tar.idx.json``), or under ``~/.cache/sopvit/shard-index/`` where the shard's folder is read-only.
The cache records the shard's size and mtime, so a rewritten shard gets a fresh index.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any

from sopvit.data.image_folder import IMAGE_EXTENSIONS

__all__ = ["MANIFEST", "ShardIndex", "build_index", "load_index", "save_index"]

MANIFEST = "shards.json"  # written by shard_writer beside the shards; names their pattern
_VERSION = 1


def _cache_dir() -> str:
    # Looked up on each call so that HOME set after import (tests, sandboxes) is honoured.
    return os.path.join(os.path.expanduser("~"), ".cache", "sopvit", "shard-index")


@dataclass
class ShardIndex:
    """Samples of one shard in tar order: key, the image member's byte range, the label (-1: no .cls)."""

    keys: list[str]
    offsets: list[int]
    sizes: list[int]
    labels: list[int]


def _stamp(shard: str) -> dict[str, int]:
    st = os.stat(shard)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _locations(shard: str) -> list[str]:
    """Where the index may be cached, in the order tried: beside the shard, then the user cache."""
    digest = hashlib.sha256(os.path.abspath(shard).encode()).hexdigest()[:24]
    return [f"{shard}.idx.json", os.path.join(_cache_dir(), f"{digest}.json")]


def _key_and_ext(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the base name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


_REGULAR = frozenset(b"0\x007")
_EXTENDED = frozenset(b"xgLKS")  # pax and GNU headers (long names, sparse files): tarfile parses those


def _plain_members(data: mmap.mmap) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of the regular files of a plain ustar tar, reading each 512-byte header
    only (3-5x faster than ``tarfile``, which decodes every field); None if extended headers need
    ``tarfile``. Raises ``tarfile.ReadError`` on a bad header or a truncated member."""
    members, offset, end = [], 0, len(data)
    while offset + 512 <= end:
        block = data[offset : offset + 512]
        if not any(block):
            break  # end-of-archive marker
        stored = block[148:156].replace(b"\0", b" ").strip()
        if not stored.isdigit() or sum(block) - sum(block[148:156]) + 256 != int(stored, 8):
            raise tarfile.ReadError(f"bad header checksum at byte {offset}")
        flag = block[156]
        if flag in _EXTENDED or block[124] & 0x80:  # 0x80: a base-256 size (a member over 8 GiB)
            return None
        size = int(block[124:136].replace(b"\0", b" ").strip() or b"0", 8)
        if flag in _REGULAR:
            name = block[:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and (prefix := block[345:500].split(b"\0", 1)[0]):
                name = prefix + b"/" + name
            if offset + 512 + size > end:
                raise tarfile.ReadError(f"member {name.decode(errors='replace')!r} is truncated")
            members.append((name.decode("utf-8", "surrogateescape"), offset + 512, size))
        offset += 512 + -(-size // 512) * 512
    if 0 < end - offset < 512:
        raise tarfile.ReadError(f"truncated header at byte {offset}")
    return members


def _tar_members(shard: str) -> list[tuple[str, int, int]]:
    with tarfile.open(shard, mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def build_index(shard: str) -> ShardIndex:
    """Scans the tar headers of ``shard`` (reading only the small ``.cls`` members)."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    with open(shard, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"not a tar file: {shard!r} (empty file)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                members = _plain_members(data)
                if members is None:
                    members = _tar_members(shard)
            except tarfile.ReadError as exc:
                raise ValueError(f"not a tar file: {shard!r} ({exc})") from None
            for name, offset, size in members:
                key, ext = _key_and_ext(name)
                if ext == "cls":
                    text = data[offset : offset + size]
                    try:
                        labels[key] = int(text.decode().strip())
                    except ValueError:
                        msg = f"{shard}:{name}: the label is not an integer: {text[:20]!r}"
                        raise ValueError(msg) from None
                elif "." + ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and key not in images:
                    images[key] = (offset, size)
                else:
                    labels.setdefault(key, -1)  # a sample with other members only: caught below
    if missing := [k for k in labels if k not in images]:
        raise ValueError(f"shard {shard!r}: sample {missing[0]!r} has no image member")
    keys = list(images)
    return ShardIndex(
        keys, [images[k][0] for k in keys], [images[k][1] for k in keys], [labels.get(k, -1) for k in keys]
    )


def _read_cached(location: str, stamp: dict[str, int]) -> ShardIndex | None:
    try:
        with open(location) as f:
            data: dict[str, Any] = json.load(f)
        if data.get("version") != _VERSION or data.get("stamp") != stamp:
            return None  # stale: the shard was rewritten since
        return ShardIndex(data["keys"], data["offsets"], data["sizes"], data["labels"])
    # A damaged cache file is rebuilt like a missing one.
    except (OSError, ValueError, AttributeError, KeyError):
        return None


def save_index(shard: str, index: ShardIndex) -> str | None:
    """Writes the index to the first writable location; its path, or None if none was writable."""
    payload = json.dumps(
        {"version": _VERSION, "stamp": _stamp(shard), **index.__dict__}, separators=(",", ":")
    )
    for location in _locations(shard):
        folder = os.path.dirname(location) or "."
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        except OSError:
            continue  # a read-only folder: try the next location
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
            os.replace(tmp, location)  # atomic: a reader never sees half an index
            return location
        except OSError:  # e.g. a full disk: the next location may still take it
            os.unlink(tmp)
    return None


def load_index(shard: str) -> ShardIndex:
    """The cached index of ``shard`` if it is fresh, else a new one (then cached)."""
    if not os.path.isfile(shard):
        raise FileNotFoundError(f"shard not found: {shard!r}")
    stamp = _stamp(shard)
    for location in _locations(shard):
        if (index := _read_cached(location, stamp)) is not None:
            return index
    index = build_index(shard)
    save_index(shard, index)
    return index
