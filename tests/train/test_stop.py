"""A stop signal ends a run at a step boundary with a checkpoint; the resumed run is the uninterrupted one."""

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from sopvit.config import ConfigError
from sopvit.data.pipeline import StepPlan
from sopvit.distributed import adopt_slurm_env, first_host
from sopvit.recipe.config import signal_number
from sopvit.train.stop import STOPS_FILE, StopSignals
from sopvit.train.trainer import Trainer
from tests.train.test_end_to_end import _assert_same_run, _final_state
from tests.train.tiny import edit_batches, tiny_config

# --- signal names -------------------------------------------------------------------------------------


def test_signal_names_with_or_without_prefix() -> None:
    assert signal_number("SIGTERM") == signal_number("term") == signal.SIGTERM
    assert signal_number("usr1") == signal.SIGUSR1


@pytest.mark.parametrize("name", ["SIGKILL", "SIGSTOP", "SIGFOO", ""])
def test_uncatchable_or_unknown_signals_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a signal a run can catch"):
        signal_number(name)


def test_a_bad_stop_signal_in_the_config_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.stop_signals.*'SIGFOO' is not a signal"):
        tiny_config(tmp_path, "run.stop_signals=[SIGTERM,SIGFOO]")


# --- the handler ------------------------------------------------------------------------------------------


def test_a_caught_signal_is_recorded_and_the_old_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(["SIGUSR1", "SIGUSR2"]) as stop:
        assert stop.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal keeps the first: its save is on its way
        assert stop.agreed() == "SIGUSR2"
        assert stop.seen == {"SIGUSR1", "SIGUSR2"}  # the launcher asks whether a requeue signal came at all
    assert signal.getsignal(signal.SIGUSR1) is before


def test_outside_the_main_thread_nothing_is_installed() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    seen: list[Any] = []

    def enter() -> None:
        with StopSignals(["SIGUSR1"]):
            seen.append(signal.getsignal(signal.SIGUSR1))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [before]


# --- in a run ---------------------------------------------------------------------------------------------


def _signal_at(trainer: Trainer, micro_batch: int, *signals: signal.Signals) -> None:
    """Send ``signals`` to this process while micro-batch ``micro_batch`` is being served (mid-step)."""

    def edit(m: int, batch: Any) -> None:
        if m == micro_batch:
            for s in signals:
                os.kill(os.getpid(), s)

    edit_batches(trainer, edit)


@pytest.mark.parametrize("accum", [1, 2])
def test_signal_mid_step_saves_after_that_step_and_resumes_exactly(tmp_path: Path, accum: int) -> None:
    flags = ["train.max_steps=7", f"train.accum_steps={accum}", "train.batch_size=8"]
    Trainer(tiny_config(tmp_path / "straight", *flags)).fit()
    stopped = Trainer(tiny_config(tmp_path / "stopped", *flags, "run.checkpoint_every=100"))
    _signal_at(stopped, 2 * accum + accum - 1, signal.SIGUSR1)  # the last micro-batch of step 3
    stopped.fit()
    assert (stopped.stopped_by, stopped.step) == ("SIGUSR1", 3)
    assert _final_state(tmp_path / "stopped")["step"] == 3
    resumed = Trainer(tiny_config(tmp_path / "stopped", *flags))
    assert resumed.step == 3
    resumed.fit()
    assert resumed.stopped_by is None
    _assert_same_run(_final_state(tmp_path / "straight"), _final_state(tmp_path / "stopped"))
    rows = [json.loads(line) for line in (tmp_path / "stopped" / STOPS_FILE).read_text().splitlines()]
    assert [(r["step"], r["reason"]) for r in rows] == [(3, "signal SIGUSR1"), (7, "finished")]


def test_a_signal_during_a_periodic_save_stops_after_it_without_saving_twice(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", "train.max_steps=7", "run.checkpoint_every=2"))
    real_save, saves = trainer.save, []

    def save_then_signal() -> None:
        real_save()
        saves.append(trainer.step)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.save = save_then_signal  # type: ignore[method-assign]
    trainer.fit()
    assert (trainer.stopped_by, saves) == ("SIGTERM", [2])


def test_the_configured_signals_are_the_ones_caught(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", "train.max_steps=5", "run.stop_signals=[USR2]"))
    handlers: list[Any] = []
    _signal_at(trainer, 1, signal.SIGUSR2)
    edit_batches(trainer, lambda m, batch: handlers.append(signal.getsignal(signal.SIGUSR1)))
    default = signal.getsignal(signal.SIGUSR1)
    trainer.fit()
    assert (trainer.stopped_by, trainer.step) == ("SIGUSR2", 2)
    assert handlers and all(h is default for h in handlers)  # SIGUSR1 is not listed: left as it was


def test_a_signal_in_the_last_step_just_finishes(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", "train.max_steps=3"))
    _signal_at(trainer, 2, signal.SIGINT)
    trainer.fit()
    assert (trainer.stopped_by, trainer.step) == (None, 3)


def test_an_error_is_recorded_with_its_step(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", "train.max_steps=5"))

    def fail(m: int, batch: Any) -> None:
        if m == 2:
            raise OSError("disk gone")

    edit_batches(trainer, fail)
    with pytest.raises(OSError, match="disk gone"):
        trainer.fit()
    row = json.loads((tmp_path / "run" / STOPS_FILE).read_text())
    assert (row["step"], row["reason"]) == (2, "error OSError: disk gone")


# --- Slurm's variables -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "first"),
    [("node01", "node01"), ("gpu[003-006,9],cpu1", "gpu003"), ("a[1-2]-b[07,09]", "a1-b07"), ("n,m", "n")],
)
def test_first_host_of_a_node_list(nodes: str, first: str) -> None:
    assert first_host(nodes) == first


SRUN_TASK = {
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[12-15]",
    "SLURM_JOB_ID": "123456",
}


def test_an_srun_task_is_spelled_as_torchrun_would() -> None:
    env = dict(SRUN_TASK)
    adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu12", str(20000 + 123456 % 20000))


def test_the_step_task_count_and_a_given_address_win() -> None:
    env = {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "head", "MASTER_PORT": "4000"}
    adopt_slurm_env(env)
    assert (env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("2", "head", "4000")


@pytest.mark.parametrize(
    "env",
    [
        {},  # no launcher
        {**SRUN_TASK, "WORLD_SIZE": "8", "RANK": "0"},  # torchrun under srun: torchrun's variables rule
        {**SRUN_TASK, "SLURM_NTASKS": "1"},  # a single task needs no group
    ],
)
def test_no_group_from_slurm_unless_srun_started_several_tasks(env: dict[str, str]) -> None:
    before = dict(env)
    adopt_slurm_env(env)
    assert env == before


# --- whole steps in every epoch: world size and accumulation can trade places ----------------------------


@pytest.mark.parametrize("n_images", [128, 120, 100])
def test_two_ranks_see_in_a_step_what_one_process_sees_in_two_micro_batches(n_images: int) -> None:
    ranks = [StepPlan(n_images, 16, world=2, rank=r, seed=4) for r in (0, 1)]
    single = StepPlan(n_images, 16, world=1, rank=0, seed=4, accum=2)
    assert single.steps_per_epoch // 2 == ranks[0].steps_per_epoch
    for step in range(3 * ranks[0].steps_per_epoch):
        two = torch.cat([plan.indices(step) for plan in ranks])
        one = torch.cat([single.indices(2 * step + j) for j in (0, 1)])
        assert torch.equal(two, one), step


def test_accumulating_more_micro_batches_than_an_epoch_holds_is_refused() -> None:
    with pytest.raises(ValueError, match=r"train\.accum_steps=4 exceeds the 3 micro-batches of one epoch"):
        StepPlan(50, 16, world=1, rank=0, seed=0, accum=4)
