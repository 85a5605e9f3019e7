"""Seconds from SIGTERM to a saved checkpoint and a finished process, as a cluster would see them.

    python benchmarks/signal_exit.py [--trials 3] [--models demo vit_small]

Each trial starts ``sopvit pretrain`` (one process, this machine's CPU), waits until it has logged two
steps, sends SIGTERM at a random moment within the next step and measures: signal -> checkpoint renamed into
place (the rest of the step plus the save), signal -> process gone, and the exit code (75 expected). The
step time is printed beside them: the stop waits for the running step, so it bounds the first number.
A job's grace period (Slurm's KillWait, 30 s by default; torchrun's 30 s) must exceed the total.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "run.progress=false",
    "run.tensorboard=false",
    "run.log_every=1",
    "run.checkpoint_every=1000000",
    "train.max_steps=100000",
    "train.device=cpu",
]
MODELS = {
    "demo": ["--config", str(ROOT / "configs/pretrain/fashion_mnist_cpu.yaml")],
    # ViT-S/16 at the paper's crops (2 x 224 + 10 x 96), a CPU-sized batch
    "vit_small": [
        "--config",
        str(ROOT / "configs/pretrain/vit_small_in1k.yaml"),
        "train.batch_size=4",
        "data.num_workers=2",
        "data.augment_on=workers",
        "data.dataset=folder",
    ],
}


def _steps_logged(run_dir: Path) -> list[dict[str, float]]:
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def trial(model: str, scratch: Path, rng: random.Random) -> dict[str, float]:
    run_dir = scratch / f"{model}-{time.monotonic_ns()}"
    extra = [f"data.path={scratch / 'jpegs'}"] if model == "vit_small" else []
    cmd = [sys.executable, "-m", "sopvit", "pretrain", *MODELS[model], *COMMON, *extra]
    proc = subprocess.Popen(
        [*cmd, f"run.output_dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while len(rows := _steps_logged(run_dir)) < 2:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-2000:] if proc.stderr else "run ended")
        time.sleep(0.01)
    images_per_s = rows[-1]["images_per_s"]
    time.sleep(rng.uniform(0, 0.5))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    checkpoint = run_dir / "checkpoint.pt"
    while not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.002)
    saved = time.monotonic()
    code = proc.wait()
    gone = time.monotonic()
    return {
        "exit_code": code,
        "to_checkpoint_s": saved - sent,
        "to_exit_s": gone - sent,
        "images_per_s": images_per_s,
        "checkpoint_mb": checkpoint.stat().st_size / 2**20 if checkpoint.exists() else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    rng = random.Random(0)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if "vit_small" in args.models:
            from sopvit.bench import synthetic_jpegs

            synthetic_jpegs(scratch / "jpegs", 64)
        header = ("model", "exit", "-> checkpoint s", "-> exit s", "images/s", "ckpt MB")
        print("{:<10} {:>4} {:>16} {:>10} {:>9} {:>8}".format(*header))
        for model in args.models:
            rows = [trial(model, scratch, rng) for _ in range(args.trials)]
            for r in rows:
                print(
                    f"{model:<10} {r['exit_code']:>4} {r['to_checkpoint_s']:>16.2f} {r['to_exit_s']:>10.2f} "
                    f"{r['images_per_s']:>9.1f} {r['checkpoint_mb']:>8.1f}"
                )
            median = statistics.median(r["to_exit_s"] for r in rows)
            print(f"{model:<10} median signal -> exit: {median:.2f} s over {len(rows)} trials")


if __name__ == "__main__":
    main()
