"""CPU cost of the per-sample multi-crop path: JPEG decode + ``MultiCropTransform``, one core.

    python benchmarks/per_sample_multicrop.py [--images 64] [--repeats 7] [--jpegs DIR]

Reads 500x375 q90 JPEGs (``sopvit.bench.synthetic_jpegs``, written to a temporary folder unless ``--jpegs``
names one) through ``ImageFolderDataset`` with the ViT-S crops (``MultiCropSpec()``: 2x224 + 10x96), with
torch on one thread. Process CPU time, not wall-clock, is measured, so other jobs sharing the machine count
far less (through caches and clock speed only: +-10% on a busy machine); the median over ``--repeats``
passes is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sopvit.bench import synthetic_jpegs
from sopvit.data import MultiCropSpec, MultiCropTransform
from sopvit.data.image_folder import ImageFolderDataset


def core_ms_per_image(dataset: ImageFolderDataset, repeats: int) -> list[float]:
    """CPU milliseconds per image of each pass over ``dataset``; the first, warm-up, pass is not kept."""
    times = []
    for i in range(repeats + 1):
        start = time.process_time()
        for j in range(len(dataset)):
            dataset[j]
        if i > 0:
            times.append(1000 * (time.process_time() - start) / len(dataset))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64, help="JPEGs per pass")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes (the median is reported)")
    parser.add_argument("--jpegs", type=Path, default=None, help="folder for the JPEGs (default: a temp one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        folder = synthetic_jpegs(args.jpegs or Path(scratch) / "jpegs", args.images)
        spec = MultiCropSpec()
        dataset = ImageFolderDataset(folder, transform=MultiCropTransform(spec))
        times = core_ms_per_image(dataset, args.repeats)
    ms = statistics.median(times)
    crops = f"2x{spec.global_size} + {spec.n_locals}x{spec.local_size}"
    print(f"per-sample multi-crop ({crops}), {args.images} JPEGs x {args.repeats} passes, 1 thread")
    print(f"passes (core-ms/image): {', '.join(f'{t:.2f}' for t in times)}")
    print(f"{ms:.2f} core-ms per image = {1000 / ms:.1f} images/s per core")


if __name__ == "__main__":
    main()
