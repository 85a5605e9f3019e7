"""Signals as a cluster sends them: to a whole job (workers included), twice, or to one rank of two.

The signal is sent from inside the run at a chosen step (``SIGNAL_AT`` below), so the test does not race the
run on a busy machine; it goes through the operating system and the real handler all the same.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sopvit.checkpoints.checkpoint import load_checkpoint
from sopvit.train.stop import EXIT_STOPPED
from tests.train.test_end_to_end import _assert_same_run
from tests.train.tiny import TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SOPVIT_DIST_TIMEOUT": "120"}
STEPS = ["train.max_steps=8", "run.checkpoint_every=100", "train.batch_size=8"]
LINE = "stopped at step {} on {}; checkpoint saved; run the same command to continue"

# Sends SIGNAL (to the process group with GROUP=1, as Slurm signals every process of a job) when micro-batch
# AT is served on rank RANK; AGAIN=1 sends it a second time while the checkpoint is being written.
SIGNAL_AT = """
import os, signal, subprocess, sys
import sopvit.checkpoints.checkpoint as ckpt
import sopvit.data.pipeline as pipeline
sig = getattr(signal, os.environ["SIGNAL"])
at, rank = int(os.environ["AT"]), os.environ.get("RANK", "0")
def send():
    if os.environ.get("GROUP") == "1":  # from another process, as slurmstepd sends it (workers tell apart)
        subprocess.run(["kill", "-s", sig.name[3:], "--", f"-{os.getpgid(0)}"], start_new_session=True)
    else:
        os.kill(os.getpid(), sig)
if rank == os.environ["SIGNAL_RANK"]:
    batches = pipeline.PretrainInputs.batches
    def signalling(self, start, stop, device):
        for m, batch in enumerate(batches(self, start, stop, device), start):
            if m == at:
                send()
            yield batch
    pipeline.PretrainInputs.batches = signalling
if os.environ.get("AGAIN") == "1":
    save = ckpt.torch.save
    def save_and_signal(obj, f):
        save(obj, f)
        send()  # the file is written, not yet renamed into place
    ckpt.torch.save = save_and_signal
from sopvit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _pretrain(script: Path, run_dir: Path, nproc: int, *extra: str) -> list[str]:
    args = ["pretrain", *TINY, *STEPS, f"run.output_dir={run_dir}", *extra]
    if nproc == 1:
        return [sys.executable, str(script), *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(script), *args]


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, env={**ENV, **env}, capture_output=True, text=True, timeout=600, start_new_session=True
    )


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "signal_at.py"
    path.write_text(SIGNAL_AT)
    return path


def _stop_and_resume(script: Path, tmp_path: Path, nproc: int, env: dict[str, str], *extra: str) -> str:
    """Run until the signal, check the exit and the line, resume; the stderr of the stopped run."""
    reference = _run(
        _pretrain(script, tmp_path / "reference", nproc, *extra), SIGNAL_RANK="none", AT="0", SIGNAL="SIGTERM"
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = _run(_pretrain(script, tmp_path / "run", nproc, *extra), **env)
    # Under torchrun the agent reports its workers' exit code 75 as a failure of its own.
    assert stopped.returncode == (EXIT_STOPPED if nproc == 1 else 1), stopped.stderr[-3000:]
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert 0 < saved["step"] < 8
    assert LINE.format(saved["step"], env["SIGNAL"]) in stopped.stderr
    resumed = _run(
        _pretrain(script, tmp_path / "run", nproc, *extra), SIGNAL_RANK="none", AT="0", SIGNAL="SIGTERM"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(
        load_checkpoint(tmp_path / "reference" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "run" / "checkpoint.pt"),
    )
    return stopped.stderr


@pytest.mark.slow
def test_sigterm_to_the_whole_job_with_loader_workers(script: Path, tmp_path: Path) -> None:
    """Slurm signals every process of a job: the loader's workers must not die and take the run with them."""
    env = {"SIGNAL": "SIGTERM", "AT": "3", "SIGNAL_RANK": "0", "GROUP": "1"}
    _stop_and_resume(script, tmp_path, 1, env, "data.num_workers=2", "data.augment_on=workers")


@pytest.mark.slow
def test_a_second_signal_while_saving_corrupts_nothing(script: Path, tmp_path: Path) -> None:
    env = {"SIGNAL": "SIGINT", "AT": "2", "SIGNAL_RANK": "0", "AGAIN": "1"}
    stderr = _stop_and_resume(script, tmp_path, 1, env)
    assert "SIGINT received again: already stopping" in stderr
    assert not list((tmp_path / "run").glob(".checkpoint.pt.tmp-*"))


@pytest.mark.slow
def test_signal_to_one_rank_of_two_stops_both_at_the_same_step(script: Path, tmp_path: Path) -> None:
    env = {"SIGNAL": "SIGUSR1", "AT": "4", "SIGNAL_RANK": "1"}
    stderr = _stop_and_resume(script, tmp_path, 2, env, "train.batch_size=4")
    assert stderr.count("stopped at step") == 1  # rank 0 says it, for both
    assert load_checkpoint(tmp_path / "reference" / "checkpoint.pt")["step"] == 8
