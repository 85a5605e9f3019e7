"""``sopvit embed | search | dedup | prototypes assign``: their arguments, and the calls they make.

Kept beside the commands' code, as ``sopvit.launch`` keeps ``submit``'s, so the top-level command line only
dispatches. The handlers import their modules when they run: ``sopvit --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _embed(args: argparse.Namespace) -> int:
    from sopvit import distributed
    from sopvit.explore.embed import EmbedOptions, embed

    options = EmbedOptions(
        checkpoint=args.checkpoint,
        data=args.data,
        out=args.out,
        feature=args.feature,
        normalize=not args.no_normalize,
        dtype=args.dtype,
        batch_size=args.batch_size,
        image_size=args.image_size,
        num_workers=args.num_workers,
        device=args.device,
        overwrite=args.overwrite,
        part_size=args.part_size,
    )
    result = embed(options)
    if distributed.is_main_process():
        print(result.summary())
    return 0


def _prototypes(args: argparse.Namespace) -> int:
    from sopvit.explore.assign import assign_prototypes

    result = assign_prototypes(
        args.checkpoint, args.embeddings, Path(args.out), args.top, args.per_prototype, args.overwrite
    )
    print(result.summary())
    return 0


def _search(args: argparse.Namespace) -> int:
    from sopvit.explore.search import search

    out = Path(args.out)
    print(search(Path(args.embeddings), Path(args.query), args.k, out, args.overwrite, args.index).summary())
    return 0


def _dedup(args: argparse.Namespace) -> int:
    from sopvit.explore.dedup import dedup

    print(dedup(Path(args.embeddings), args.threshold, Path(args.out), args.overwrite, args.index).summary())
    return 0


def add_explore_parsers(sub: Any, debug_flag: argparse.ArgumentParser) -> None:
    """Add the four commands to ``sub`` (the top-level parser's subparsers)."""
    em = sub.add_parser(
        "embed",
        parents=[debug_flag],
        help="the backbone's features of every image of a folder or of shards, as a Parquet table",
    )
    em.add_argument(
        "--checkpoint",
        required=True,
        help="run directory, its checkpoint.pt or checkpoint-NNNNNN directory (these add the head column), "
        "or an export",
    )
    em.add_argument("--data", required=True, help="image folder (class subfolders: labels) or tar shards")
    em.add_argument("--out", required=True, help="table folder to write, e.g. embeddings.parquet")
    em.add_argument("--feature", default="cls", help="cls (default), cls+avgpool or lastN, as sopvit eval")
    em.add_argument("--no-normalize", action="store_true", help="keep raw features (default: unit length)")
    em.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--image-size", type=int, help="resolution (default: the backbone's)")
    em.add_argument("--num-workers", type=int, help="image decoding processes (default: cores, up to 8)")
    em.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda or cuda:N")
    em.add_argument("--overwrite", action="store_true", help="replace a table of another run at --out")
    em.add_argument("--part-size", type=int, default=10_000, help="images per part file (the resume unit)")
    em.set_defaults(func=_embed)
    pr = sub.add_parser("prototypes", parents=[debug_flag], help="which prototype each of your images is")
    pr_sub = pr.add_subparsers(dest="action", required=True)
    pa = pr_sub.add_parser(
        "assign",
        parents=[debug_flag],
        help="assign each image of an embeddings table to its nearest prototype of the run",
    )
    pa.add_argument(
        "--checkpoint",
        required=True,
        help="the run the table was embedded with: its directory, checkpoint.pt or checkpoint-NNNNNN",
    )
    pa.add_argument("--embeddings", required=True, help="table written by sopvit embed from that run")
    pa.add_argument("--out", required=True, help="folder for assignments.parquet, prototypes.csv, index.html")
    pa.add_argument("--top", type=int, default=12, help="largest prototypes shown in index.html")
    pa.add_argument("--per-prototype", type=int, default=8, help="nearest images shown per prototype")
    pa.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier assignment")
    pa.set_defaults(func=_prototypes)
    index_help = "exact (IndexFlatIP), ivf (IndexIVFFlat) or auto: IVF where its build pays (docs/search.md)"
    se = sub.add_parser(
        "search", parents=[debug_flag], help="nearest images of an embeddings table to query images"
    )
    se.add_argument("--embeddings", required=True, help="table written by sopvit embed")
    se.add_argument("--query", required=True, help="an image, a folder of images, or another table")
    se.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    se.add_argument("--out", default="search", help="folder for the results and index.html (default: search)")
    se.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    se.add_argument("--index", default="auto", choices=["auto", "exact", "ivf"], help=index_help)
    se.set_defaults(func=_search)
    dd = sub.add_parser("dedup", parents=[debug_flag], help="groups of near-duplicate images of a table")
    dd.add_argument("--embeddings", required=True, help="table written by sopvit embed")
    dd.add_argument("--threshold", type=float, default=0.95, help="cosine similarity, in (0, 1]")
    dd.add_argument("--out", default="dedup", help="folder for groups.csv and index.html (default: dedup)")
    dd.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    dd.add_argument("--index", default="auto", choices=["auto", "exact", "ivf"], help=index_help)
    dd.set_defaults(func=_dedup)
