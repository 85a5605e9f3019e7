"""Tar shards against the image folder they were packed from: read and decode rates, index cost, file opens.

    python benchmarks/shards.py [--quick] [--wids] [--json out.json]

Two data sets, written as JPEG files and then packed with ``write_shards`` (1000 images per shard):
Fashion-MNIST's 60k 28 x 28 training images (grayscale, class subfolders) and 5k synthetic 500 x 375
quality-90 JPEGs (``sopvit.bench.synthetic_jpegs``); ``--quick``: 6k and 500. Every rate is images per
CPU-second of one thread (``torch.set_num_threads(1)``, no workers): the per-core rate, in random order as
the pre-training plan reads. The files are in the page cache (as on a node that has read them once):
what shards save on a cold or network file system (one open and metadata lookup per image) comes on top.

- ``read``: the raw bytes only (``FileBytesDataset``: a folder's ``np.fromfile`` against a shard's ``pread``).
- ``workers``: ``augment_on=workers``' per-sample work: read, PIL decode and ``MultiCropTransform``.
- ``device``: ``augment_on=device``' work on a CPU: read bytes and ``BatchDecoder`` (batches of 64).
- ``index``: building every shard's index from its tar headers, and loading the cached one, per 10k.
- ``opens``: files opened per 1k images read (an audit hook counts every ``open``/``os.open``).
- ``--wids`` (needs ``pip install 'webdataset<1'``): webdataset's indexed reader on the same shards.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
_OPENS = {"on": False, "count": 0}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _OPENS["on"]:
        _OPENS["count"] += 1


def per_cpu_second(run: Callable[[], int], repeat: int = 1) -> float:
    """Images per CPU-second of ``run()`` (which returns how many images it handled), best of ``repeat``:
    other processes on the host only ever slow a pass down."""
    best = 0.0
    for _ in range(repeat):
        start = time.process_time()
        n = run()
        best = max(best, n / max(time.process_time() - start, 1e-9))
    return best


def opens_per_1k(read: Callable[[int], Any], order: np.ndarray) -> float:
    """``open`` calls while ``read`` takes the first 1000 images of ``order``, from a cold dataset."""
    _OPENS["count"], _OPENS["on"] = 0, True
    try:
        for i in order[:1000]:
            read(int(i))
    finally:
        _OPENS["on"] = False
    return _OPENS["count"] * 1000 / min(1000, len(order))


def fashion_mnist_jpegs(folder: Path, n: int) -> Path:
    from PIL import Image

    from sopvit.data import load_fashion_mnist

    images, labels = load_fashion_mnist("train", limit=n)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        (folder / str(int(y))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(folder / str(int(y)) / f"{i:05d}.jpg", quality=90)
    return folder


def measure_source(kind: str, path: str, order: np.ndarray, spec: Any, n_augment: int) -> dict[str, float]:
    """Rates and opens of one source ("folder" or "shards") on both augment_on paths."""
    from sopvit.data.datasets import build_dataset
    from sopvit.data.decode import BatchDecoder, FileBytesDataset
    from sopvit.data.transforms import MultiCropTransform

    files = FileBytesDataset(build_dataset(kind, path))  # type: ignore[arg-type]
    augmented = build_dataset(kind, path, transform=MultiCropTransform(spec))
    decode, few, cpu = BatchDecoder(), order[:n_augment], torch.device("cpu")

    def read() -> int:
        return sum(1 for i in order if files[int(i)])

    def workers(indices: np.ndarray = few) -> int:
        return sum(1 for i in indices if augmented[int(i)])

    def device(indices: np.ndarray = few) -> int:
        for b in range(0, len(indices), 64):
            decode([files[int(i)] for i in indices[b : b + 64]], files, cpu, spec.in_chans)
        return len(indices)

    row = {
        "opens_per_1k_device": opens_per_1k(files.__getitem__, order),
        "opens_per_1k_workers": opens_per_1k(augmented.__getitem__, order),
    }
    workers(order[-64:]), device(order[-64:])  # warm-up: lazy imports, first-call allocations
    row["read"] = round(per_cpu_second(read, repeat=3))
    row["workers"] = round(per_cpu_second(workers), 1)
    row["device"] = round(per_cpu_second(device), 1)
    return row


def measure(name: str, src: Path, out: Path, recipe: str, n_augment: int, wids: bool) -> dict[str, Any]:
    from sopvit.config import load_config
    from sopvit.data.shard_index import load_index
    from sopvit.data.shard_writer import write_shards
    from sopvit.data.shards import resolve_shards
    from sopvit.recipe.config import pretrain_config_type

    spec = load_config(pretrain_config_type(), recipe, ["data.path=-"]).data.crop_spec()
    start = time.perf_counter()
    packed = write_shards(src, out, per_shard=1000)
    row: dict[str, Any] = {"data": name, "images": packed.images, "shards": packed.shards}
    row["pack_images_per_s"] = round(packed.images / (time.perf_counter() - start))
    shards = resolve_shards(str(out))

    def index_all() -> int:
        return sum(len(load_index(s).keys) for s in shards)

    for idx in out.glob("*.idx.json"):
        idx.unlink()
    row["index_build_s_per_10k"] = round(1e4 / per_cpu_second(index_all), 4)  # once: it is cached
    row["index_load_s_per_10k"] = round(1e4 / per_cpu_second(index_all, repeat=3), 4)
    order = np.random.default_rng(0).permutation(packed.images)
    for kind, path in (("folder", str(src)), ("shards", str(out))):
        row.update(
            {f"{key}_{kind}": v for key, v in measure_source(kind, path, order, spec, n_augment).items()}
        )
    if wids:
        row.update(measure_wids(shards, order))
    print(json.dumps(row), flush=True)
    return row


def measure_wids(shards: list[str], order: np.ndarray) -> dict[str, Any]:
    """webdataset's wids reader: its index (an mmap header scan, redone whenever a shard is opened, no
    cache) and its random-access reads, with an LRU holding all shards and with its default of 10."""
    from wids import ShardListDataset
    from wids.wids_mmtar import MMIndexedTar

    from sopvit.data.shard_index import load_index

    specs = [{"url": s, "nsamples": len(load_index(s).keys)} for s in shards]
    total = sum(int(s["nsamples"]) for s in specs)

    def index_all() -> int:
        for s in shards:
            MMIndexedTar(s).close()
        return total

    row: dict[str, Any] = {"wids_index_build_s_per_10k": round(1e4 / per_cpu_second(index_all, repeat=3), 4)}
    for lru in sorted({len(shards), 10}):
        ds = ShardListDataset(specs, localname=lambda url: url, lru_size=lru, transformations=[])
        row[f"wids_opens_per_1k_lru{lru}"] = opens_per_1k(ds.__getitem__, order)
        # A too-small LRU re-opens and re-indexes a shard on most reads: a few thousand tell the rate.
        some = order if lru >= len(shards) else order[:3000]

        def read(ds: Any = ds, some: np.ndarray = some) -> int:
            return sum(1 for i in some if ds[int(i)][".jpg"])

        row[f"wids_read_lru{lru}"] = round(per_cpu_second(read, repeat=3 if lru >= len(shards) else 1))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="6k Fashion-MNIST and 500 synthetic images")
    parser.add_argument("--wids", action="store_true", help="also time webdataset's wids reader")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from sopvit.bench import synthetic_jpegs

    torch.set_num_threads(1)
    sys.addaudithook(_audit)
    fmnist_n, synthetic_n = (6000, 500) if args.quick else (60000, 5000)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        fmnist = fashion_mnist_jpegs(tmp / "fmnist", fmnist_n)
        rows.append(
            measure(
                "fashion_mnist 28x28",
                fmnist,
                tmp / "fmnist-shards",
                str(ROOT / "configs/pretrain/fashion_mnist_cpu.yaml"),
                min(fmnist_n, 3000),
                args.wids,
            )
        )
        synthetic = synthetic_jpegs(tmp / "synthetic", synthetic_n)
        rows.append(
            measure(
                "synthetic 500x375",
                synthetic,
                tmp / "synthetic-shards",
                str(ROOT / "configs/pretrain/vit_small_in1k.yaml"),
                min(synthetic_n, 300),
                args.wids,
            )
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
