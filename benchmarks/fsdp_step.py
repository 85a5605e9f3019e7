"""What sharding costs where it is not needed: CPU step time of ViT-S/16 on 2 gloo ranks, DDP vs FSDP
(and FSDP with activation checkpointing), the same global batch and crops.

    python benchmarks/fsdp_step.py [--steps 4] [--batch 2] [--json OUT]

Each mode runs ``torchrun --nproc-per-node 2 -m sopvit pretrain`` with the ViT-S recipe (2 x 224 + 10 x 96
crops) on synthetic JPEGs, one thread per rank, and reports the median seconds per step after the first
(warm-up) step, from the run's own metrics.jsonl, and the wall time of its checkpoint save.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "ddp": ["train.parallel=ddp"],
    "fsdp": ["train.parallel=fsdp"],
    "fsdp+ac": ["train.parallel=fsdp", "train.activation_checkpointing=true"],
}


def run(mode: str, scratch: Path, steps: int, batch: int) -> dict[str, float]:
    run_dir = scratch / mode
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "sopvit",
        "pretrain",
        "--config",
        str(ROOT / "configs/pretrain/vit_small_in1k.yaml"),
        *MODES[mode],
        f"train.batch_size={batch}",
        f"train.max_steps={steps}",
        "train.device=cpu",
        "data.dataset=folder",
        f"data.path={scratch / 'jpegs'}",
        "data.num_workers=0",
        "data.augment_on=workers",
        "run.log_every=1",
        "run.progress=false",
        "run.tensorboard=false",
        f"run.checkpoint_every={steps}",
        f"run.output_dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    images = 2 * batch
    seconds = [images / r["images_per_s"] for r in rows[1:]]
    return {"step_s": statistics.median(seconds), "loss": rows[-1]["loss"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from sopvit.bench import synthetic_jpegs

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        synthetic_jpegs(scratch / "jpegs", 64)
        for mode in args.modes:
            results[mode] = run(mode, scratch, args.steps, args.batch)
            print(
                f"{mode:8s} {results[mode]['step_s']:.2f} s/step  loss {results[mode]['loss']:.4f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}, indent=2))


if __name__ == "__main__":
    main()
