"""SIGKILL at random points, and in the middle of a checkpoint write: resuming gives the same run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sopvit.checkpoints.checkpoint import load_checkpoint
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


def _checkpoint_id(run_dir: Path) -> tuple[int, int] | None:
    """Changes at every checkpoint write: each one is a new file renamed into place."""
    try:
        stat = (run_dir / "checkpoint.pt").stat()
        return stat.st_ino, stat.st_mtime_ns
    except FileNotFoundError:
        return None


def _run_until_killed(run_dir: Path, writes: int, jitter: float) -> bool:
    """Run; SIGKILL it `jitter` s after its next `writes` checkpoints. False if it finished first.

    Kills are tied to progress, not to wall time, so a fast machine cannot finish the run before the
    first kill and a slow one cannot be killed before it has written anything.
    """
    proc = subprocess.Popen(_command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    seen, last, deadline = 0, _checkpoint_id(run_dir), time.monotonic() + 300
    while proc.poll() is None and seen < writes:
        assert time.monotonic() < deadline, "the run wrote no checkpoint for 300 s"
        now = _checkpoint_id(run_dir)
        seen, last = seen + (now is not None and now != last), now
        time.sleep(0.005)
    if proc.poll() is None:
        time.sleep(jitter)
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == -signal.SIGKILL:
        return True
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    return False


@pytest.mark.slow
def test_random_sigkills_then_resume_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    run_dir, rng, kills = tmp_path / "killed", random.Random(7), 0
    while kills < 4 and _run_until_killed(run_dir, writes=rng.randint(1, 2), jitter=rng.uniform(0.0, 0.05)):
        kills += 1
        load_checkpoint(run_dir / "checkpoint.pt")  # whatever moment the kill hit, it loads
    assert kills >= 1
    done = subprocess.run(_command(run_dir), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_run(_reference(tmp_path), load_checkpoint(run_dir / "checkpoint.pt"))


KILL_DURING_WRITE = """
import os, signal, sys
import sopvit.checkpoints.checkpoint as ckpt
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
