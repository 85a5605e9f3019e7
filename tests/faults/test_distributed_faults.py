"""A rank dies mid-run: torchrun ends the run instead of hanging, and with --max-restarts it resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sopvit.checkpoints.checkpoint import load_checkpoint
from tests.train.tiny import TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SOPVIT_DIST_TIMEOUT": "60"}


def _torchrun(run_dir: Path, restarts: int) -> subprocess.Popen[bytes]:
    log = open(run_dir.parent / f"torchrun-{restarts}.log", "wb")  # noqa: SIM115 (the child holds it)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        "-m",
        "sopvit",
        "pretrain",
        *TINY,
        "data.augment_on=workers",
        "train.batch_size=8",
        "train.epochs=40",
        "train.max_steps=40",
        "run.checkpoint_every=2",
        f"run.output_dir={run_dir}",
    ]
    return subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _kill_one_worker_after_first_checkpoint(agent: subprocess.Popen[bytes], run_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert agent.poll() is None, "torchrun ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    workers = _children(agent.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)


@pytest.mark.slow
def test_dead_rank_ends_the_run_without_hanging(tmp_path: Path) -> None:
    agent = _torchrun(tmp_path / "run", restarts=0)
    try:
        _kill_one_worker_after_first_checkpoint(agent, tmp_path / "run")
        assert agent.wait(timeout=90) != 0  # the surviving rank is stopped, not left waiting forever
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    log = (tmp_path / "torchrun-0.log").read_text()
    # The survivor says what happened when its collective failed first (torchrun may SIGTERM it sooner).
    assert "lost contact with the other ranks" in log or "SIGTERM" in log


@pytest.mark.slow
def test_max_restarts_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    agent = _torchrun(tmp_path / "run", restarts=1)
    try:
        _kill_one_worker_after_first_checkpoint(agent, tmp_path / "run")
        code = agent.wait(timeout=240)
        assert code == 0, (tmp_path / "torchrun-1.log").read_text()[-4000:]
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 40
