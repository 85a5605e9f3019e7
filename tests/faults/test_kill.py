"""SIGKILL at random points, and in the middle of a checkpoint write: resuming gives the same run."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sopvit.train.checkpoint import load_checkpoint
from tests.train.test_end_to_end import _assert_same_run
from tests.train.tiny import TINY

STEPS = ["train.max_steps=10", "run.checkpoint_every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "sopvit", "pretrain", *TINY, *STEPS, f"run.output_dir={run_dir}"]


def _reference(tmp_path: Path) -> dict:
    """The uninterrupted run, in a process of the same kind (thread count changes float sums)."""
    done = subprocess.run(_command(tmp_path / "reference"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_checkpoint(tmp_path / "reference" / "checkpoint.pt")


@pytest.mark.slow
def test_random_sigkills_then_resume_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    run_dir, rng, kills = tmp_path / "killed", random.Random(7), 0
    while True:
        proc = subprocess.Popen(_command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        try:
            proc.wait(timeout=rng.uniform(2.5, 5.0) if kills < 4 else 300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            if (run_dir / "checkpoint.pt").exists():
                load_checkpoint(run_dir / "checkpoint.pt")  # whatever moment the kill hit, it loads
            continue
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        break
    assert kills >= 1
    _assert_same_run(_reference(tmp_path), load_checkpoint(run_dir / "checkpoint.pt"))


KILL_DURING_WRITE = """
import os, signal, sys
import sopvit.train.checkpoint as ckpt
writes = [0]
real_replace = os.replace
def dying_replace(src, dst):
    writes[0] += str(dst).endswith("checkpoint.pt")
    if writes[0] == 4:  # the 4th checkpoint is written to its temporary file, then the process dies
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
ckpt.os.replace = dying_replace
from sopvit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_in_the_middle_of_a_checkpoint_write(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    args = ["pretrain", *TINY, *STEPS, f"run.output_dir={run_dir}"]
    died = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, *args], env=ENV, capture_output=True)
    assert died.returncode == -signal.SIGKILL
    assert list(run_dir.glob(".checkpoint.pt.tmp-*")), "the interrupted write left its temporary file"
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 3  # the previous checkpoint is whole
    done = subprocess.run(_command(run_dir), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(run_dir.glob(".checkpoint.pt.tmp-*"))
    final = load_checkpoint(run_dir / "checkpoint.pt")
    _assert_same_run(_reference(tmp_path), final)
    assert torch.isfinite(final["objective"]["cls_bank.embeddings"]).all()
