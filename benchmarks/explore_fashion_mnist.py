"""The embed -> search -> prototypes workflow on Fashion-MNIST's 10k test images, one row per run.

    python benchmarks/explore_fashion_mnist.py --runs sop=runs/fm_sop ibot=runs/fm_ibot dino=runs/fm_dino \
        [--images /tmp/fm_test] [--out benchmarks/results/explore_fashion_mnist]

The test images are written once as PNGs in class subfolders (the labels are only read for scoring). Each
run's teacher embeds them with ``sopvit embed``. Then ``sopvit search`` runs every image against the same
table, with k = 11 so that the image itself can be dropped. The score is the share of its 10 nearest other
images that have its class (recall of same-class neighbours @10). Last, ``sopvit prototypes assign`` groups
the images, scored by purity: the share of images whose group's majority class is their own. Purity rises
with the number of groups, so the count of non-empty groups is printed beside it. Raw pixels (L2-normalised)
are the baseline: searched the same way, and grouped by k-means with SOP's number of prototypes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def write_images(folder: Path) -> None:
    from PIL import Image

    from sopvit.data import load_fashion_mnist

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == 10000:
        return
    images, labels = load_fashion_mnist("test")
    for i, (img, y) in enumerate(zip(images, labels)):
        d = folder / f"{int(y)}-{NAMES[int(y)]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(d / f"{i:05d}.png")


def sopvit(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "sopvit", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"sopvit {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def recall_at_10(table: Path, scratch: Path) -> float:
    out = scratch / f"search-{table.name}"
    sopvit("search", "--embeddings", str(table), "--query", str(table), "--k", "11", "--out", str(out))
    hits = pd.read_parquet(out / "results.parquet")
    hits = hits[hits["query"] != hits["path"]].sort_values(["query", "rank"]).groupby("query").head(10)
    label_of = pd.read_parquet(table, columns=["path", "label"]).set_index("path")["label"]
    return float((hits["label"].to_numpy() == label_of.loc[hits["query"]].to_numpy()).mean())


def purity(labels: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    frame = pd.DataFrame({"label": labels, "group": groups})
    majority = frame.groupby("group")["label"].agg(lambda s: s.value_counts().iloc[0]).sum()
    return float(majority / len(frame)), int(frame["group"].nunique())


def pixel_row(images: Path, scratch: Path, k: int) -> dict[str, float]:
    from sopvit.data import load_fashion_mnist
    from sopvit.explore.table import TableMeta, write_part

    pixels, labels = load_fashion_mnist("test")
    vectors = pixels.flatten(1).float().numpy()
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [str(images / f"{int(y)}-{NAMES[int(y)]}" / f"{i:05d}.png") for i, y in enumerate(labels)]
    table = scratch / "pixels.parquet"
    table.mkdir()
    meta = TableMeta("pixels", "pixels", "Fashion-MNIST test", "pixels", True, 784, "float32", 28)
    write_part(table / "part-000-00000.parquet", meta, paths, labels.numpy(), vectors)
    kmeans = faiss.Kmeans(784, k, niter=25, seed=0, spherical=True)
    kmeans.train(vectors)
    groups = kmeans.index.search(vectors, 1)[1][:, 0]
    p, used = purity(labels.numpy(), groups)
    return {"recall_at_10": recall_at_10(table, scratch), "purity": p, "groups": used}


def run_row(name: str, run: Path, images: Path, scratch: Path) -> dict[str, float]:
    table = scratch / f"{name}.parquet"
    sopvit("embed", "--checkpoint", str(run), "--data", str(images), "--out", str(table))
    assigned = scratch / f"{name}-prototypes"
    sopvit(
        "prototypes", "assign", "--checkpoint", str(run), "--embeddings", str(table), "--out", str(assigned)
    )
    groups = pd.read_parquet(assigned / "assignments.parquet")
    p, used = purity(groups["label"].to_numpy(), groups["prototype"].to_numpy())
    return {"recall_at_10": recall_at_10(table, scratch), "purity": p, "groups": used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="name=RUN_DIR ...")
    parser.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "fm_test")
    parser.add_argument("--pixel-groups", type=int, default=64, help="k-means groups of the pixel baseline")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    write_images(args.images)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        rows["raw pixels"] = pixel_row(args.images, scratch, args.pixel_groups)
        for spec in args.runs:
            name, run = spec.split("=", 1)
            rows[name] = run_row(name, Path(run), args.images, scratch)
    lines = [
        "| representation | same-class neighbours @10 | group purity | groups used |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {100 * r['recall_at_10']:.2f} | {100 * r['purity']:.2f} | {r['groups']} |")
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
