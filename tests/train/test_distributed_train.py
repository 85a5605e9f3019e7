"""`torchrun --nproc_per_node 2` on gloo reproduces one process fed the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sopvit.train.checkpoint import load_checkpoint
from tests.train.tiny import TINY

# Per-sample augmentation is seeded by (seed, step, image), so ranks see exactly the single-process crops.
COMMON = [*TINY, "data.batched_augment=false", "train.max_steps=3", "run.log_every=1"]


def _run(run_dir: Path, nproc: int, batch: int) -> None:
    args = [*COMMON, f"train.batch_size={batch}", f"run.output_dir={run_dir}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "sopvit", "pretrain", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "sopvit",
            "pretrain",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    _run(tmp_path / "one", 1, 16)
    _run(tmp_path / "two", 2, 8)
    one, two = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("one", "two"))
    for key in ("cls_bank.embeddings", "patch_bank.embeddings"):
        torch.testing.assert_close(two["objective"][key], one["objective"][key], atol=2e-5, rtol=1e-4)
    for key in ("cls_bank.sample_ids", "patch_bank.sample_ids"):
        assert torch.equal(two["objective"][key], one["objective"][key])
    for key, value in one["teacher"].items():
        torch.testing.assert_close(two["teacher"][key], value, atol=2e-5, rtol=1e-4, msg=key)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
