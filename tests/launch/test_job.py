"""The submitted job's decisions after a stop, its submitit hook, and the parsing it relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
from submitit.core.utils import JobPaths
from submitit.helpers import DelayedSubmission

from sopvit.launch.job import PretrainJob, RequeueLimitError, stop_signals_with
from sopvit.launch.options import SubmitError, format_minutes, parse_time
from sopvit.train.stop import EXIT_STOPPED


class FakeEnv:
    """What ``after_stop`` uses of submitit's JobEnvironment; records requeues instead of calling scontrol."""

    def __init__(self, folder: Path, rank: int = 0) -> None:
        self.global_rank = rank
        self.paths = JobPaths(folder, job_id="7", task_id=rank)
        self.requeued: list[int] = []

    def _requeue(self, countdown: int) -> None:
        self.requeued.append(countdown)


def _submitted(tmp_path: Path, job: PretrainJob) -> FakeEnv:
    env = FakeEnv(tmp_path)
    env.paths.folder.mkdir(parents=True, exist_ok=True)
    delayed = DelayedSubmission(job)
    delayed.set_timeout(60, job.max_requeues)
    delayed.dump(env.paths.submitted_pickle)
    return env


def _next_job(env: FakeEnv) -> PretrainJob:
    job = DelayedSubmission.load(env.paths.submitted_pickle).function
    assert isinstance(job, PretrainJob)
    return job


def test_checkpoint_hands_on_the_same_job_one_requeue_further_until_the_limit() -> None:
    job = PretrainJob("r.yaml", ("a=1",), max_requeues=2)
    following = job.checkpoint()
    assert following is not None and following.function == PretrainJob("r.yaml", ("a=1",), 2, requeues=1)
    last = PretrainJob("r.yaml", ("a=1",), max_requeues=2, requeues=2)
    assert last.checkpoint() is None  # submitit's own handler then ends the job instead of requeueing


def test_the_requeue_signal_requeues_through_submitits_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = PretrainJob(None, (), max_requeues=3, requeues=1)
    env = _submitted(tmp_path, job)
    with pytest.raises(SystemExit) as stop:
        job.after_stop(env, 12, "SIGUSR2", set())  # type: ignore[arg-type]
    assert stop.value.code == EXIT_STOPPED
    assert env.requeued == [1]
    assert _next_job(env).requeues == 2
    assert DelayedSubmission.load(env.paths.submitted_pickle)._timeout_countdown == 1
    assert (
        "stopped at step 12 on SIGUSR2; checkpoint saved; requeueing (1 requeues left)"
        in capsys.readouterr().err
    )


def test_sigterm_followed_by_the_requeue_signal_requeues(tmp_path: Path) -> None:
    """A preemption on submitit's clusters: SIGTERM first (the trainer stops on it), then USR2."""
    job = PretrainJob(None, (), max_requeues=3)
    env = _submitted(tmp_path, job)
    with pytest.raises(SystemExit):
        job.after_stop(env, 5, "SIGTERM", {"SIGTERM", "SIGUSR2"})  # type: ignore[arg-type]
    assert env.requeued == [2]


def test_sigterm_alone_is_a_scancel_and_is_not_requeued(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = PretrainJob(None, (), max_requeues=3)
    env = _submitted(tmp_path, job)
    with pytest.raises(SystemExit) as stop:
        job.after_stop(env, 5, "SIGTERM", {"SIGTERM"})  # type: ignore[arg-type]
    assert stop.value.code == EXIT_STOPPED and env.requeued == []
    assert _next_job(env).requeues == 0
    assert "not requeued (SIGTERM without SIGUSR2 is a scancel" in capsys.readouterr().err


def test_only_global_rank_zero_requeues(tmp_path: Path) -> None:
    job = PretrainJob(None, (), max_requeues=3)
    env = _submitted(tmp_path, job)
    env.global_rank = 1
    with pytest.raises(SystemExit) as stop:
        job.after_stop(env, 5, "SIGUSR2", {"SIGUSR2"})  # type: ignore[arg-type]
    assert stop.value.code == EXIT_STOPPED and env.requeued == []
    assert _next_job(env).requeues == 0


def test_past_max_requeues_the_job_ends_with_one_line(tmp_path: Path) -> None:
    job = PretrainJob(None, (), max_requeues=2, requeues=2)
    env = _submitted(tmp_path, job)
    with pytest.raises(RequeueLimitError) as err:
        job.after_stop(env, 9, "SIGUSR2", set())  # type: ignore[arg-type]
    assert str(err.value) == (
        "stopped at step 9 on SIGUSR2; checkpoint saved; not requeued: 2 requeues reached --max-requeues 2; "
        "submit the same command again to continue the run"
    )
    assert env.requeued == []


def test_stop_signals_gain_the_requeue_signal_once_with_full_names() -> None:
    assert stop_signals_with(("TERM", "SIGINT"), "SIGUSR2") == ["SIGTERM", "SIGINT", "SIGUSR2"]
    assert stop_signals_with(["usr2", "SIGTERM"], "SIGUSR2") == ["SIGUSR2", "SIGTERM"]


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("90:30", 91), ("72:00:00", 4320), ("3-00", 4320), ("1-12:30", 2190), ("0-00:00:01", 1),
     ("2-01:02:03", 2943)],
)  # fmt: skip
def test_slurm_time_formats(text: str, minutes: int) -> None:
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "72h", "1:2:3:4", "-1", "1-", "1.5", "UNLIMITED", "0", "0-0"])
def test_malformed_or_zero_times_are_refused(text: str) -> None:
    with pytest.raises(SubmitError, match=r"^--time "):
        parse_time(text)


def test_minutes_print_as_slurm_writes_them() -> None:
    assert [format_minutes(m) for m in (1, 90, 1440, 4321)] == [
        "00:01:00",
        "01:30:00",
        "1-00:00:00",
        "3-00:01:00",
    ]
