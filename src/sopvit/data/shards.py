"""Images packed in WebDataset-layout tar shards, served exactly as the folder they were packed from.

A large data set as millions of small files costs one ``open`` (and, on network file systems, a metadata
round trip) per image; as a thousand tars it costs one open per shard per worker. Each sample is the tar
members sharing a key (``000123.jpg``, optionally ``000123.cls`` holding the label). Access is random,
through an index of byte ranges (``sopvit.data.shard_index``), because the pre-training pipeline seeds
each image's augmentation by its data-set index: reading item ``i`` must give the folder's item ``i``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import resource
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from sopvit.data.image_folder import ImageFolderDataset, decode_image
from sopvit.data.shard_index import MANIFEST, load_index

__all__ = ["ShardDataset", "expand_braces", "resolve_shards"]

logger = logging.getLogger(__name__)

# Open shards kept per process: a quarter of the descriptor limit leaves room for the loader's pipes and
# sockets, and the cap bounds a worker on a set of thousands of shards.
_MAX_OPEN = max(8, min(512, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _split_top(body: str) -> list[str]:
    """``body`` cut at the commas outside nested braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    return [*parts, body[start:]]


def expand_braces(pattern: str) -> list[str]:
    """Shell brace expansion: ``{000..012}`` (zero-padded as written), ``{a,b}``, several and nested.

    A brace group with neither ``..`` nor a comma (e.g. ``{x}``) is kept literally, as bash does.
    """
    depth, open_at = 0, -1
    for i, ch in enumerate(pattern):
        if ch == "{":
            open_at, depth = (i, 1) if depth == 0 else (open_at, depth + 1)
        elif ch == "}" and depth:
            depth -= 1
            if depth:
                continue
            head, body, tail = pattern[:open_at], pattern[open_at + 1 : i], pattern[i + 1 :]
            if m := _RANGE.match(body):
                lo, hi = int(m[1]), int(m[2])
                padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in m.groups())
                width = max(len(m[1]), len(m[2])) if padded else 0
                step = 1 if hi >= lo else -1
                options = [str(v).zfill(width) for v in range(lo, hi + step, step)]
            elif len(parts := _split_top(body)) > 1:
                options = [o for part in parts for o in expand_braces(part)]
            else:
                return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
            return [head + o + rest for o in options for rest in expand_braces(tail)]
    return [pattern]


def resolve_shards(path: str) -> list[str]:
    """The shard files ``path`` names, sorted: a brace pattern and/or glob, or a folder (its manifest's
    pattern if it has one, else every ``*.tar`` in it)."""
    if os.path.isdir(path):
        manifest = os.path.join(path, MANIFEST)
        if os.path.isfile(manifest):
            try:
                with open(manifest) as f:
                    pattern = json.load(f).get("pattern")
            except (ValueError, AttributeError):  # not JSON, or not an object
                pattern = None
            if not isinstance(pattern, str):
                raise ValueError(f"{manifest!r} does not name its shards (no 'pattern' string)")
            return resolve_shards(os.path.join(path, pattern))
        path = os.path.join(path, "*.tar")
    found: set[str] = set()
    missing: list[str] = []
    for name in expand_braces(path):
        if glob.has_magic(name):
            found.update(glob.glob(name))
        elif os.path.exists(name):
            found.add(name)
        else:
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]!r}{more}, listed by data.path {path!r}")
    # A glob like DIR/* also matches the writer's index files and manifest: they are not shards.
    files = sorted(f for f in found if not f.endswith(".idx.json") and os.path.basename(f) != MANIFEST)
    if not files:
        raise FileNotFoundError(f"no shard matches data.path {path!r}")
    return files


class ShardDataset(ImageFolderDataset):
    """The images of the tar shards ``pattern`` names, in shard order then tar order.

    Args:
        pattern: a brace pattern and/or glob (``train-{000000..001023}.tar``), or a folder of shards
            (see :func:`resolve_shards`).
        transform, mode: as for :class:`ImageFolderDataset`.

    Items, labels, bad-file skipping and warnings are ``ImageFolderDataset``'s (this class only changes
    where the bytes come from); ``paths[i]`` is the item's identity ``SHARD.tar:KEY``, ``label`` the
    integer in ``KEY.cls`` or -1. ``read_bytes(i)`` gives the raw image bytes for the batched decoder.
    """

    def __init__(
        self,
        pattern: str,
        transform: Callable[[Image.Image], Any] | None = None,
        mode: str = "RGB",
    ) -> None:
        # ImageFolderDataset's constructor scans a folder; everything else of it applies unchanged.
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        self.root, self.transform, self.mode = pattern, transform, mode
        self.shards = resolve_shards(pattern)
        self.paths, self.labels = [], []
        shard_ids: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        for s, shard in enumerate(self.shards):
            index = load_index(shard)
            self.paths += [f"{shard}:{key}" for key in index.keys]
            self.labels += index.labels
            shard_ids += [s] * len(index.keys)
            offsets += index.offsets
            sizes += index.sizes
        if not self.paths:
            raise ValueError(f"the shards of {pattern!r} hold no images")
        # numpy, not lists: workers fork with these, and lists of ints would be copied page by page
        # as their reference counts are touched.
        self._shard = np.asarray(shard_ids, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._size = np.asarray(sizes, dtype=np.int64)
        self.classes = self._manifest_classes()
        self.unreadable: dict[int, str] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        logger.info("indexed %d images in %d shards of %r", len(self.paths), len(self.shards), pattern)

    def _manifest_classes(self) -> list[str]:
        """The class names ``shard_writer`` recorded, when the shards came with its manifest."""
        path = os.path.join(os.path.dirname(self.shards[0]), MANIFEST)
        try:
            with open(path) as f:
                classes = json.load(f).get("classes", [])
        except (OSError, ValueError, AttributeError):
            return []
        known = max(self.labels) < len(classes)
        return [str(c) for c in classes] if known else []

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pattern={self.root!r}, shards={len(self.shards)}, n={len(self)}, "
            f"classes={len(self.classes)})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Open descriptors mean nothing in another process: a spawned worker opens its own.
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = OrderedDict(), None
        return state

    def __del__(self) -> None:
        # Only the owner closes: a forked copy's descriptors are its own, but its _pid still names the parent.
        try:
            if getattr(self, "_pid", None) == os.getpid():
                self._close_all()
        except (OSError, TypeError, AttributeError):  # at interpreter exit os may already be torn down
            pass

    def _close_all(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            # A forked worker inherits the parent's descriptors; its own keep reads independent of them.
            self._close_all()
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.shards[shard], os.O_RDONLY)
            self._fds[shard] = fd
            if len(self._fds) > _MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def _check(self, index: int, got: int) -> None:
        if got != self._size[index]:
            raise OSError(f"shard truncated: read {got} of {int(self._size[index])} bytes")

    def _read(self, index: int) -> bytes:
        """The image member's bytes (for PIL: a BytesIO over bytes shares them instead of copying)."""
        # pread, not seek + read: a descriptor has no file position to share, between threads or after fork.
        data = os.pread(self._fd(int(self._shard[index])), int(self._size[index]), int(self._offset[index]))
        self._check(index, len(data))
        return data

    def read_bytes(self, index: int) -> np.ndarray:
        """The item's raw bytes as a writable uint8 array (``FileBytesDataset``'s source), read in place."""
        buf = bytearray(int(self._size[index]))
        self._check(index, os.preadv(self._fd(int(self._shard[index])), [buf], int(self._offset[index])))
        return np.frombuffer(buf, dtype=np.uint8)  # writable: it views the bytearray

    def try_load(self, index: int) -> Image.Image | None:
        if index in self.unreadable:
            return None
        try:
            return decode_image(io.BytesIO(self._read(index)), self.mode)
        # The folder's rule: any failure to read or decode means "bad file".
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.unreadable[index] = reason
            path = self.paths[index]
            warnings.warn(f"skipping unreadable image {path!r} ({reason})", RuntimeWarning, stacklevel=3)
            return None
