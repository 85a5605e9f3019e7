"""``sopvit submit`` on a login node: the script it would submit, the mistakes it refuses, the submission."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from submitit.helpers import DelayedSubmission

from sopvit.cli import main
from sopvit.launch.job import PretrainJob
from tests.launch.jobs import JOB_ID, REPO, fake_slurm
from tests.train.tiny import TINY

RECIPE = REPO / "configs" / "pretrain" / "vit_small_in1k.yaml"
FULL = [
    "--nodes", "2", "--gpus-per-node", "4", "--time", "72:00:00", "--partition", "gpu", "--account", "acct",
    "--qos", "high", "--constraint", "a100", "--mem", "480G", "--cpus-per-task", "10", "--max-requeues", "5",
    "--signal-delay", "180",
]  # fmt: skip


def _settings(out: str) -> dict[str, str]:
    head = out.split("\n# sbatch script")[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in head.splitlines())}


def test_dry_run_prints_the_sbatch_script_line_by_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    argv = ["submit", *FULL, "--dry-run", "--", "pretrain", "--config", str(RECIPE), "data.path=/data/in1k"]
    assert main([*argv, f"run.output_dir={run}"]) == 0
    out = capsys.readouterr().out
    logs = run / "slurm"
    sbatch = sorted(line for line in out.splitlines() if line.startswith("#SBATCH"))
    assert sbatch == [
        "#SBATCH --account=acct",
        "#SBATCH --constraint=a100",
        "#SBATCH --cpus-per-task=10",
        f"#SBATCH --error={logs}/%j_0_log.err",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --job-name=sopvit-run",
        "#SBATCH --mem=480G",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}/%j_0_log.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --qos=high",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@180",
        "#SBATCH --time=4320",
        "#SBATCH --wckey=submitit",
    ]
    srun = [line for line in out.splitlines() if line.startswith("srun ")]
    python = shlex.quote(sys.executable)
    assert srun == [
        f"srun --unbuffered --output {logs}/%j_%t_log.out --error {logs}/%j_%t_log.err "
        f"{python} -u -m submitit.core._submit {logs}"
    ]
    assert "export SUBMITIT_EXECUTOR=slurm" in out.splitlines()
    settings = _settings(out)
    assert settings["nodes"] == "2"
    assert settings["tasks per node"] == "4 (one per GPU; 8 in all)"
    assert settings["gpus per node"] == "4"
    assert settings["time limit"] == "3-00:00:00 (4320 min) per job"
    assert settings["signal"].startswith("SIGUSR2 180 s before the time limit")
    assert settings["requeues"] == "at most 5"
    assert settings["run dir"] == str(run)
    assert settings["command"] == (
        f"sopvit pretrain --config {RECIPE} data.path=/data/in1k run.output_dir={run} run.resume=true "
        "'run.stop_signals=[SIGTERM,SIGUSR1,SIGINT,SIGUSR2]'"
    )
    assert not run.exists()  # a dry run writes nothing


def test_relative_paths_are_pinned_and_the_users_own_run_keys_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["submit", "--time", "90", "--dry-run", "--", "pretrain", *TINY, "run.output_dir=runs/a"]
    assert main([*args, "run.resume=false", "run.stop_signals=[TERM]", "--config", "none.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text("train:\n  epochs: 3\n")
    assert main([*args, "run.resume=false", "run.stop_signals=[TERM]", "--config", "r.yaml"]) == 0
    out = capsys.readouterr().out
    command = _settings(out)["command"]
    assert command == shlex.join(
        [
            "sopvit", "pretrain", "--config", str(tmp_path / "r.yaml"), *TINY,
            f"run.output_dir={tmp_path / 'runs' / 'a'}", "run.resume=true",
            "run.stop_signals=[SIGTERM,SIGUSR2]",
        ]
    )  # fmt: skip
    assert _settings(out)["time limit"] == "01:30:00 (90 min) per job"
    assert "#SBATCH --job-name=sopvit-a" in out.splitlines()


ERRORS = [
    (["--time", "72h"], "--time '72h' is not a time limit"),
    (["--time", "2:30", "--signal-delay", "60"], None),  # minutes:seconds, rounded up to 3 min: valid
    (["--time", "00:00"], "--time '00:00' is zero"),
    (["--time", "60", "--nodes", "0"], "--nodes 0: must be >= 1"),
    (["--time", "60", "--gpus-per-node", "0"], "--gpus-per-node 0: must be >= 1"),
    (["--time", "60", "--cpus-per-task", "0"], "--cpus-per-task 0: must be >= 1"),
    (["--time", "60", "--max-requeues", "-1"], "--max-requeues -1: must be >= 0"),
    (["--time", "1", "--signal-delay", "60"], "--signal-delay 60 s is not shorter than --time 1"),
    (["--time", "60", "--signal-delay", "0"], "--signal-delay 0: must be between 1 and 65535"),
    (["--time", "60", "--mem", "64GB"], "--mem '64GB': use a size such as 480G"),
    (["--time", "60", "--partition", "gpu a100"], "--partition 'gpu a100': must be a non-empty word"),
]


@pytest.mark.parametrize(("flags", "message"), ERRORS, ids=[" ".join(f) for f, _ in ERRORS])
def test_flag_mistakes_are_one_line(
    flags: list[str], message: str | None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    code = main(["submit", *flags, "--dry-run", "--", "pretrain", *TINY, f"run.output_dir={run}"])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    assert code == 2
    assert err.strip().splitlines() == [f"sopvit: error: {err.strip().removeprefix('sopvit: error: ')}"]
    assert message in err
    assert not run.exists()


COMMAND_ERRORS = [
    ([], "nothing to submit: end the command with -- pretrain"),
    (["--"], "nothing to submit"),
    (["--", "eval", "knn"], "sopvit submit runs only `pretrain`, not 'eval'"),
    (["--", "pretrain", "--steps", "3"], "the submitted pretrain command does not take --steps 3"),
    (["--", "pretrain", "--config"], "the submitted command: argument --config: expected one argument"),
    (["--", "pretrain", *TINY, "train.lrr=1"], "sopvit: config error: unknown key 'train.lrr'"),
    (["--", "pretrain", "--config", str(RECIPE)], "sopvit: config error: data.path: is required"),
]


@pytest.mark.parametrize(("words", "message"), COMMAND_ERRORS, ids=[" ".join(w) for w, _ in COMMAND_ERRORS])
def test_command_mistakes_fail_before_the_queue(
    words: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["submit", "--time", "60", *words]) == 2  # not a dry run: nothing may reach sbatch
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "bin" / "sbatch_script.sh").exists()


def test_an_existing_run_is_not_submitted_with_resume_false(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    argv = ["submit", "--time", "60", "--dry-run", "--", "pretrain", *TINY, f"run.output_dir={run}"]
    assert main([*argv, "run.resume=false"]) == 2
    assert f"{run} already holds a run and run.resume=false" in capsys.readouterr().err
    assert main(argv) == 0  # resuming it is what a submitted run does anyway


def test_without_srun_it_says_where_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["submit", "--time", "60", "--", "pretrain", *TINY, f"run.output_dir={tmp_path / 'r'}"]) == 2
    assert "srun is not on PATH: run sopvit submit on a Slurm login node" in capsys.readouterr().err


def test_sbatch_refusal_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_slurm(tmp_path / "bin", sbatch_exit=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert main(["submit", "--time", "60", "--", "pretrain", *TINY, f"run.output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "sopvit: error: sbatch refused the job: sbatch: error: invalid partition specified: gpux" in err


def test_submission_sends_the_dry_run_script_and_a_resumable_job(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    run = tmp_path / "run"
    argv = ["submit", "--time", "2:00:00", "--gpus-per-node", "2", "--max-requeues", "3"]
    command = ["--", "pretrain", *TINY, f"run.output_dir={run}"]
    assert main([*argv, "--dry-run", *command]) == 0
    script = capsys.readouterr().out.split("# sbatch script (--dry-run: nothing was submitted)\n")[1]
    assert main([*argv, *command]) == 0
    out = capsys.readouterr().out
    assert f"submitted job {JOB_ID}; follow it with: tail -f {run}/slurm/{JOB_ID}_0_log.out" in out
    assert (tmp_path / "bin" / "sbatch_script.sh").read_text() == script.removesuffix("\n")
    job = DelayedSubmission.load(run / "slurm" / f"{JOB_ID}_submitted.pkl").function
    assert isinstance(job, PretrainJob)
    assert (job.requeues, job.max_requeues, job.requeue_signal) == (0, 3, "SIGUSR2")
    assert job.argv == ["pretrain", *TINY, f"run.output_dir={run}", "run.resume=true",
                        "run.stop_signals=[SIGTERM,SIGUSR1,SIGINT,SIGUSR2]"]  # fmt: skip
