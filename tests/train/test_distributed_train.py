"""`torchrun --nproc_per_node 2` on gloo reproduces one process fed the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sopvit.checkpoints.checkpoint import load_checkpoint
from tests.train.tiny import TINY

# Augmentation and masks are seeded by (seed, epoch, image) on both paths, anchors by a generator every rank
# shares, so ranks see exactly the single-process crops, masks (random ratios, unmasked images) and anchors.
# Drop path (each rank's own torch stream) and KoLeo (nearest neighbour within the rank's batch) are per
# rank by design, as in DINO/DINOv2: they are on only in the resume test below.
COMMON = [
    *TINY,
    "train.max_steps=3",
    "run.log_every=1",
    "data.mask_prob=0.5",
    "data.mask_ratio=[0.1,0.5]",
    "sop.anchor_selection=low_cv",
]
ALL_RANDOM = ["model.drop_path_rate=0.3", "sop.koleo_weight=0.1"]


def _run(run_dir: Path, nproc: int, batch: int, *extra: str) -> None:
    args = [*COMMON, f"train.batch_size={batch}", f"run.output_dir={run_dir}", *extra]
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
@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_two_ranks_match_one_process(tmp_path: Path, augment_on: str) -> None:
    _run(tmp_path / "one", 1, 16, f"data.augment_on={augment_on}")
    _run(tmp_path / "two", 2, 8, f"data.augment_on={augment_on}")
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


@pytest.mark.slow
def test_two_ranks_resume_exactly_with_every_source_of_randomness(tmp_path: Path) -> None:
    _run(tmp_path / "straight", 2, 8, *ALL_RANDOM, "train.max_steps=4")
    _run(tmp_path / "resumed", 2, 8, *ALL_RANDOM, "train.max_steps=2")
    _run(tmp_path / "resumed", 2, 8, *ALL_RANDOM, "train.max_steps=4")
    straight, resumed = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("straight", "resumed"))
    assert straight["step"] == resumed["step"] == 4
    for part in ("student", "teacher", "objective"):
        for key, value in straight[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(resumed[part][key], value), (part, key)
