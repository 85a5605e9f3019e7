"""A submitted run stopped by Slurm's signal requeues itself and ends equal to an uninterrupted run.

Two ways in, both through the real signal handlers and the real submitit pickles: submitit's local executor
(its controller restarts the job when the job exits with the local requeue code), and the script a real
``sopvit submit`` sent to a fake ``sbatch``, run as Slurm runs a task, with a fake ``scontrol`` that records
the requeue; "Slurm" then starts the task again with ``SLURM_RESTART_COUNT=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import submitit
from submitit.core.utils import pickle_load

from sopvit.checkpoints.checkpoint import load_checkpoint
from sopvit.cli import main
from sopvit.train.stop import EXIT_STOPPED
from tests.launch.jobs import JOB_ID, REPO, RUN_AS_SLURM_TASK, SignalAtJob, fake_slurm, slurm_task_env
from tests.train.test_end_to_end import _assert_same_run
from tests.train.tiny import TINY

# 30 steps, and no checkpoint before the end but the one the stop writes.
STEPS = ["train.epochs=4", "train.max_steps=30", "run.checkpoint_every=1000"]
AT = 10  # the micro-batch at which the first job signals itself


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run, in a process of the same kind (the thread count changes float sums)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    command = [sys.executable, "-m", "sopvit", "pretrain", *TINY, *STEPS, f"run.output_dir={run_dir}"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_checkpoint(run_dir / "checkpoint.pt")


def _wait(job: submitit.Job[Any], limit_s: float = 400) -> None:
    deadline = time.monotonic() + limit_s
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"the job did not end in {limit_s} s:\n{job.stderr()}")
        time.sleep(0.5)


def _stops(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "stops.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_local_executor_job_requeues_on_usr2_and_resumes_exactly(
    tmp_path: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run_dir = tmp_path / "run"
    overrides = (*TINY, *STEPS, f"run.output_dir={run_dir}")
    executor = submitit.LocalExecutor(tmp_path / "logs", max_num_timeout=2)
    executor.update_parameters(timeout_min=60)  # the controller's own time limit stays out of the way
    job = executor.submit(SignalAtJob(None, overrides, max_requeues=2, at=AT))
    _wait(job)
    row = job.result()
    out, err = job.stdout() or "", job.stderr() or ""
    assert out.count(f"sopvit: job {job.job_id} task 0 of 1") == 2, out  # the first job and the requeued one
    assert "after 1 of at most 2 requeues" in out
    assert "SIGUSR2 received: stopping at the end of this step" in err
    assert "checkpoint saved; requeueing (1 requeues left)" in err
    assert row and row["skipped_steps"] == 0.0
    stops = _stops(run_dir)
    assert [s["reason"] for s in stops] == ["signal SIGUSR2", "finished"]
    assert 0 < stops[0]["step"] < 30 and stops[1]["step"] == 30
    _assert_same_run(reference, load_checkpoint(run_dir / "checkpoint.pt"))


@pytest.mark.slow
def test_two_task_local_job_requeues_from_rank_0_when_only_rank_1_is_signalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run_dir = tmp_path / "run"
    overrides = (*TINY, "train.max_steps=6", "train.batch_size=8", f"run.output_dir={run_dir}")
    executor = submitit.LocalExecutor(tmp_path / "logs", max_num_timeout=1)
    executor.update_parameters(timeout_min=60, tasks_per_node=2)
    job = executor.submit(SignalAtJob(None, overrides, max_requeues=1, at=2, ranks=(1,)))
    _wait(job)
    rank0, rank1 = job._sub_jobs  # type: ignore[attr-defined]
    assert len(load_checkpoint(run_dir / "checkpoint.pt")["rng"]) == 2  # both tasks trained in one group
    assert "SIGUSR2 received" in (rank1.stderr() or "") and "SIGUSR2 received" not in (rank0.stderr() or "")
    assert "requeueing (0 requeues left)" in (rank0.stderr() or "")
    assert "requeueing" not in (rank1.stderr() or "")
    assert (rank1.stdout() or "").count("task 1 of 2") == 2
    stops = _stops(run_dir)
    assert [s["reason"] for s in stops] == ["signal SIGUSR2", "finished"]
    assert 0 < stops[0]["step"] < 6 and stops[1]["step"] == 6


@pytest.mark.slow
def test_submitted_slurm_job_requeues_with_scontrol_and_resumes_exactly(
    tmp_path: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    fake_slurm(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    command = ["--", "pretrain", *TINY, *STEPS, f"run.output_dir={run_dir}"]
    assert main(["submit", "--time", "30", "--max-requeues", "1", *command]) == 0
    assert f"submitted job {JOB_ID}" in capsys.readouterr().out
    logs = run_dir / "slurm"
    task = [sys.executable, "-u", "-c", RUN_AS_SLURM_TASK, str(logs)]  # as the sbatch script's srun line

    first = subprocess.run(
        task, env=slurm_task_env(bin_dir, AT=str(AT), SIGNAL="SIGUSR2"), capture_output=True, text=True
    )
    assert first.returncode == EXIT_STOPPED, first.stderr[-3000:]
    assert (bin_dir / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"  # rank 0 asked Slurm to requeue
    assert "checkpoint saved; requeueing (0 requeues left)" in first.stderr
    assert not (logs / f"{JOB_ID}_0_result.pkl").exists()  # the job is not over

    again = subprocess.run(
        task, env=slurm_task_env(bin_dir, SLURM_RESTART_COUNT="1"), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "after 1 of at most 1 requeues" in again.stdout
    outcome, row = pickle_load(logs / f"{JOB_ID}_0_result.pkl")
    assert outcome == "success" and row["skipped_steps"] == 0.0
    stops = _stops(run_dir)
    assert [(s["reason"], s["job_id"], s["restart"]) for s in stops] == [
        ("signal SIGUSR2", JOB_ID, 0),
        ("finished", JOB_ID, 1),
    ]
    assert (bin_dir / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"  # finishing requeues nothing
    _assert_same_run(reference, load_checkpoint(run_dir / "checkpoint.pt"))
