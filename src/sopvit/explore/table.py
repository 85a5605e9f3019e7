"""The embeddings table: one Parquet row per image, readable as it is by pandas, polars and DuckDB.

A table is a folder of part files (``part-RRR-NNNNN.parquet``: rank, then part index), so a run split over
ranks or cut short writes whole files that read as one data set, and a rerun continues after the last
complete part. Columns:

- ``path`` (string): the image file, or ``SHARD.tar:KEY`` for an image in a tar shard;
- ``label`` (int64): its class subfolder's index, -1 when the folder has none;
- ``embedding`` (fixed-size list of float32 or float16, ``dim``): the backbone feature;
- ``head`` (fixed-size list of float32, ``head_dim``; only from a training run): the teacher's projection
  head output, L2-normalised - the space SOP's memories and iBOT/DINO's prototype vectors live in.

What the numbers mean is in the schema's metadata (key ``sopvit``, JSON of :class:`TableMeta`), so a table
from another backbone or feature kind is refused instead of compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

FORMAT = "sopvit-embeddings"
VERSION = 1
META_KEY = b"sopvit"
PART_GLOB = "part-*.parquet"


class EmbeddingsError(ValueError):
    """An embeddings table is missing, foreign, or from another backbone; the message names both sides."""


@dataclass(frozen=True)
class TableMeta:
    backbone: str  # architecture, e.g. "vit_small"
    fingerprint: str  # of the backbone's weights (:func:`fingerprint`): same name, other weights differ
    source: str  # the checkpoint or export the backbone came from
    feature: str  # "cls" | "cls+avgpool" | "lastN" (the evaluators' feature kinds)
    normalized: bool
    dim: int
    dtype: str  # "float32" | "float16"
    image_size: int
    head_dim: int | None = None  # width of the ``head`` column; None: no head column

    def describe(self) -> str:
        return f"{self.backbone} ({self.fingerprint}, {self.feature}, {self.dim}-d, from {self.source})"

    def check_same_backbone(self, other: TableMeta, what: str, other_what: str) -> None:
        """Refuse, naming both, to compare vectors of another backbone or feature kind."""
        mine = (self.fingerprint, self.feature, self.dim, self.normalized)
        theirs = (other.fingerprint, other.feature, other.dim, other.normalized)
        if mine != theirs:
            raise EmbeddingsError(
                f"{what} holds {self.describe()} but {other_what} holds {other.describe()}: "
                "embed both with the same checkpoint and --feature"
            )


def fingerprint(module: nn.Module) -> str:
    """16 hex digits of a SHA-256 over the module's state (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def schema(meta: TableMeta) -> pa.Schema:
    value = pa.float16() if meta.dtype == "float16" else pa.float32()
    fields = [
        pa.field("path", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("embedding", pa.list_(value, meta.dim)),
    ]
    if meta.head_dim is not None:
        fields.append(pa.field("head", pa.list_(pa.float32(), meta.head_dim)))
    body = json.dumps({"format": FORMAT, "version": VERSION, **dataclasses.asdict(meta)})
    return pa.schema(fields, metadata={META_KEY: body.encode()})


def _fixed(values: np.ndarray, width: int, kind: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=kind)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def write_part(
    path: Path,
    meta: TableMeta,
    paths: list[str],
    labels: np.ndarray,
    embeddings: np.ndarray,
    head: np.ndarray | None = None,
) -> None:
    """Write one part file atomically (temporary name, then rename): a part on disk is always whole.

    ``embeddings``: (N, dim) float; ``head``: (N, head_dim) float32, required iff ``meta.head_dim`` is set.
    """
    if embeddings.shape != (len(paths), meta.dim) or labels.shape != (len(paths),):
        raise ValueError(
            f"{len(paths)} paths need labels ({len(paths)},) and embeddings ({len(paths)}, {meta.dim}), "
            f"got {labels.shape} and {embeddings.shape}"
        )
    if (head is None) != (meta.head_dim is None):
        raise ValueError("head values are given exactly when meta.head_dim is set")
    table_schema = schema(meta)
    np_dtype = np.float16 if meta.dtype == "float16" else np.float32
    columns: list[pa.Array] = [
        pa.array(paths, pa.string()),
        pa.array(labels.astype(np.int64)),
        _fixed(embeddings.astype(np_dtype), meta.dim, table_schema.field("embedding").type.value_type),
    ]
    if head is not None and meta.head_dim is not None:
        columns.append(_fixed(head.astype(np.float32), meta.head_dim, pa.float32()))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_arrays(columns, schema=table_schema), tmp)
    os.replace(tmp, path)


def part_files(root: Path) -> list[Path]:
    """A table's part files in (rank, index) order; a single ``.parquet`` file is a table of one part."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise EmbeddingsError(f"embeddings {root} do not exist: write them with sopvit embed")
    parts = sorted(root.glob(PART_GLOB))
    if not parts:
        raise EmbeddingsError(f"{root} holds no part files ({PART_GLOB}): write it with sopvit embed")
    return parts


def read_meta(root: Path) -> TableMeta:
    """The metadata of a table (every part must agree), or a one-line refusal of a foreign file."""
    metas = {_meta_of(p) for p in part_files(root)}
    if len(metas) > 1:
        raise EmbeddingsError(
            f"{root} mixes part files of different backbones or features: {sorted(map(str, metas))}"
        )
    return metas.pop()


def _meta_of(part: Path) -> TableMeta:
    try:
        raw = (pq.read_schema(part).metadata or {}).get(META_KEY)
    except (OSError, pa.ArrowException) as err:
        raise EmbeddingsError(f"{part} is not a readable Parquet file ({err})") from None
    if raw is None:
        raise EmbeddingsError(
            f"{part} is a Parquet file but not a sopvit embeddings table (no '{META_KEY.decode()}' metadata)"
        )
    values: dict[str, Any] = json.loads(raw)
    if values.pop("format", None) != FORMAT or values.pop("version", None) != VERSION:
        raise EmbeddingsError(
            f"{part} is an embeddings table of another format or version than {FORMAT} v{VERSION}"
        )
    return TableMeta(**values)


@dataclass
class Embeddings:
    """A whole table in memory: the vectors as float32 numpy arrays, rows in part order."""

    meta: TableMeta
    paths: list[str]
    labels: np.ndarray  # (N,) int64
    vectors: np.ndarray  # (N, dim) float32
    head: np.ndarray | None  # (N, head_dim) float32


def read_embeddings(root: Path) -> Embeddings:
    meta = read_meta(root)
    tables = [pq.read_table(p) for p in part_files(root)]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def matrix(column: str, width: int) -> np.ndarray:
        flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.astype(np.float32).reshape(-1, width)

    return Embeddings(
        meta=meta,
        paths=table.column("path").to_pylist(),
        labels=table.column("label").to_numpy().astype(np.int64),
        vectors=matrix("embedding", meta.dim),
        head=matrix("head", meta.head_dim) if meta.head_dim is not None else None,
    )
