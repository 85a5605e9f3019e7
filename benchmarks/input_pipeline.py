"""Input pipeline alone, both paths: images/s and host CPU core-ms per image on ImageNet-like JPEGs.

    python benchmarks/input_pipeline.py [--batches 6] [--batch 64] [--workers 0 2] [--device cpu cuda]
                                        [--recipe configs/pretrain/vit_small_in1k.yaml] [--json out.json]

Each row runs ``PretrainInputs`` of the recipe (ViT-S/16: 2 x 224 + 10 x 96 crops with iBOT masks) over
synthetic 500 x 375 quality-90 JPEGs (``sopvit.bench.synthetic_jpegs``: smooth colour fields that
compress like photos), through ``sopvit.bench.time_inputs``: images/s after two warm-up batches, and the
CPU time of the whole pass (main process, all its threads, and the DataLoader workers) per image.
``augment_on=workers`` decodes and augments per image in the workers (``--workers 0``: in the main
process, so its rate is the per-core rate); ``augment_on=device`` has the workers read bytes and the
device decode and augment whole batches (on ``--device cpu`` the CPU does that work, so its core-ms is the
whole cost; on ``cuda`` the host part is reading, launching and the parameters).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def host_share(recipe: str, folder: Path, batches: int, batch: int) -> float:
    """CPU ms per image of what the host does on the device path when a GPU decodes and augments: read the
    bytes, pack them for hand-over, derive the image keys, every crop's parameters and the masks. Kernel
    launches (about 200 per batch) are not included."""
    from sopvit.config import load_config
    from sopvit.data.batched import BatchMultiCrop
    from sopvit.data.counter_rng import image_keys
    from sopvit.data.decode import FileBytesDataset
    from sopvit.data.pipeline import PretrainInputs, _pack_files, _unpack_files
    from sopvit.recipe.config import pretrain_config_type

    overrides = [
        f"data.path={folder}",
        "data.dataset=folder",
        "data.augment_on=device",
        f"train.batch_size={batch}",
    ]
    cfg = load_config(pretrain_config_type(), recipe, overrides)
    inputs = PretrainInputs(cfg.data, cfg.model.patch_size or 16, batch, 1, 0, cfg.train.seed)
    files = FileBytesDataset(inputs.dataset)  # type: ignore[arg-type]
    augment = BatchMultiCrop(inputs.spec)
    sizes = [torch.empty(0, 375, 500)] * batch  # the synthetic JPEGs' size, as the decoder would report it
    start = time.process_time()
    for m in range(batches):
        idx = inputs.plan.indices(m)
        items = _unpack_files(_pack_files([files[int(i)] for i in idx]))
        keys = image_keys(cfg.train.seed, 0, torch.tensor([item["index"] for item in items]))
        augment.params(sizes, keys)
        inputs.device_masks(keys)
    return 1000 * (time.process_time() - start) / (batches * batch)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=str(ROOT / "configs/pretrain/vit_small_in1k.yaml"))
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--device", nargs="+", default=["cpu"])
    parser.add_argument("--paths", nargs="+", default=["workers", "device"], choices=["workers", "device"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from sopvit.bench import device_name, time_inputs
    from sopvit.config import load_config
    from sopvit.recipe.config import pretrain_config_type

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for device in args.device:
            for path in args.paths:
                for workers in args.workers:
                    overrides = [
                        f"data.path={scratch}/jpegs",
                        f"data.augment_on={path}",
                        f"data.num_workers={workers}",
                        f"train.batch_size={args.batch}",
                        f"train.device={device}",
                    ]
                    cfg = load_config(pretrain_config_type(), args.recipe, overrides)
                    result = time_inputs(cfg, args.batches, Path(scratch))
                    row = {
                        "device": device_name(torch.device(device)),
                        "augment_on": path,
                        "workers": workers,
                        "images_per_s": round(result["input_images_per_s"], 1),
                        "cpu_ms_per_image": round(result["input_cpu_ms_per_image"], 2),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        if "device" in args.paths:
            row = {
                "device": "host share of augment_on=device on a GPU",
                "cpu_ms_per_image": round(
                    host_share(args.recipe, Path(scratch) / "jpegs", args.batches, args.batch), 3
                ),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
