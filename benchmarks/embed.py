"""``sopvit embed`` throughput on the CPU: images per second, end to end, for two backbones.

    python benchmarks/embed.py [--quick] [--threads N] [--json out.json]

- ``demo``: the model of ``configs/pretrain/fashion_mnist_cpu.yaml`` (a 4-block 128-wide ViT, 7 px patches)
  at 28 px, on 28 x 28 JPEGs (Fashion-MNIST's size);
- ``vit_small``: ViT-S/16 at 224 px, on 500 x 375 quality-90 JPEGs (ImageNet's typical size).

Both are randomly initialised (speed does not depend on the weights) and saved as a timm export, so the
table has no head column; a run's projection head adds one small MLP per image (under 1% of ViT-S, about
3% of the demo model). ``embed img/s``: the whole ``embed()`` call (checkpoint load, folder scan, decode in
the loader's workers, forward, Parquet parts) over the images; ``forward img/s``: the backbone alone on
ready tensors, batch 64, the ceiling that decoding and writing leave room for. The host's load is
printed: on a busy host, more torch threads than idle cores make OpenMP spin (on 2 cores at load 8 the
demo model's forward ran at 109 images/s with 2 threads and 1722 with ``--threads 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sopvit.bench import synthetic_jpegs  # noqa: E402
from sopvit.explore.embed import EmbedOptions, embed  # noqa: E402
from sopvit.models import Backbone, create_backbone  # noqa: E402


def demo_backbone() -> Backbone:
    model = yaml.safe_load((ROOT / "configs/pretrain/fashion_mnist_cpu.yaml").read_text())["model"]
    size = ("patch_size", "embed_dim", "depth", "num_heads")
    return create_backbone(model["arch"], img_size=28, in_chans=1, **{k: model[k] for k in size})


def save_timm_export(backbone: Backbone, folder: Path) -> Path:
    """The ``timm`` export (``backbone.pth`` beside ``timm_args.json``) that ``load_pretrained`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.model.state_dict(), folder / "backbone.pth")
    args = {"arch": backbone.arch, "kind": backbone.kind, "timm_name": backbone.timm_name}
    (folder / "timm_args.json").write_text(json.dumps({**args, "timm_kwargs": backbone.timm_kwargs}))
    return folder / "backbone.pth"


@torch.inference_mode()
def forward_rate(backbone: Backbone, size: int, channels: int, batches: int = 3) -> float:
    backbone.eval()
    x = torch.randn(64, channels, size, size)
    backbone(x)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        backbone(x)
    return 64 * batches / (time.perf_counter() - start)


def measure(
    name: str, backbone: Backbone, size: int, jpeg: tuple[int, int], n: int, scratch: Path
) -> dict[str, Any]:
    channels = int(backbone.model.patch_embed.proj.in_channels)
    checkpoint = save_timm_export(backbone, scratch / name / "export")
    images = synthetic_jpegs(scratch / name / "images", n, size=jpeg)
    out = scratch / name / "embeddings.parquet"
    start = time.perf_counter()
    result = embed(EmbedOptions(str(checkpoint), str(images), str(out), device="cpu"))
    seconds = time.perf_counter() - start
    assert result.rows == n
    return {
        "model": name,
        "px": size,
        "images": n,
        "dim": result.meta.dim,
        "embed_img_s": n / seconds,
        "forward_img_s": forward_rate(backbone, size, channels),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<10} {'px':>4} {'images':>7} {'dim':>5} {'embed img/s':>12} {'forward img/s':>14}"]
    for r in rows:
        lines.append(
            f"{r['model']:<10} {r['px']:>4} {r['images']:>7} {r['dim']:>5} {r['embed_img_s']:>12.1f} "
            f"{r['forward_img_s']:>14.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    demo_n, small_n = (500, 64) if args.quick else (5000, 384)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        rows = [
            measure("demo", demo_backbone(), 28, (28, 28), demo_n, scratch),
            measure("vit_small", create_backbone("vit_small_patch16_224"), 224, (500, 375), small_n, scratch),
        ]
    print(f"CPU cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, load: {os.getloadavg()}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
