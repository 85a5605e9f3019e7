"""What a submitted Slurm job runs: the pre-train, in-process, and its own requeue when Slurm asks it to stop.

Why the job, not submitit, handles the signal: submitit's handler for USR2 (the signal its sbatch script asks
for before the time limit) checkpoints the callable and exits on the spot, inside whatever the process was
doing. A run must save between two optimizer steps, with every rank agreeing on which step, so the signal is
one of the trainer's ``run.stop_signals`` while it trains: its handler only records it, the ranks save at the
next step boundary, ``fit()`` returns, and only then does global rank 0 hand the next job to submitit
(``checkpoint()``, the same hook submitit's own handler calls) and requeue. Outside ``fit()`` (building the
model, loading a checkpoint) submitit's handler is in place and does the same without a save: nothing new was
trained yet. The requeued job resumes the same run directory, exactly.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from typing import NoReturn

from submitit import JobEnvironment
from submitit.core import job_environment
from submitit.helpers import DelayedSubmission

from sopvit import distributed
from sopvit.config import load_config
from sopvit.recipe.config import pretrain_config_type, signal_number
from sopvit.train.stop import EXIT_STOPPED


class RequeueLimitError(RuntimeError):
    """The run stopped for a requeue after ``--max-requeues`` requeues; it ends here, its checkpoint saved."""


def requeue_signal() -> str:
    """The signal submitit's sbatch script asks for before the time limit (``SUBMITIT_PREEMPT_SIGNAL``)."""
    return signal.Signals(signal_number(JobEnvironment.USR_SIG)).name


def stop_signals_with(names: tuple[str, ...] | list[str], extra: str) -> list[str]:
    """``names`` spelled as ``signal.Signals`` names, with ``extra`` added if missing."""
    return list(dict.fromkeys(signal.Signals(signal_number(n)).name for n in (*names, extra)))


@dataclass(frozen=True)
class PretrainJob:
    """``sopvit pretrain --config CONFIG OVERRIDES`` as a picklable, checkpointable submitit callable."""

    config: str | None
    overrides: tuple[str, ...]
    max_requeues: int
    requeue_signal: str = "SIGUSR2"
    requeues: int = 0  # the requeues before this job: checkpoint() hands the next one this plus one

    @property
    def argv(self) -> list[str]:
        return ["pretrain", *(["--config", self.config] if self.config else []), *self.overrides]

    def __call__(self) -> dict[str, float]:
        from sopvit.train.trainer import Trainer

        env = JobEnvironment()
        _join_local_group(env, self.requeues)
        print(
            f"sopvit: job {env.job_id} task {env.global_rank} of {env.num_tasks} on {env.hostname} "
            f"(pid {os.getpid()}), after {self.requeues} of at most {self.max_requeues} requeues: "
            f"sopvit {shlex.join(self.argv)}",
            flush=True,
        )
        cfg = load_config(pretrain_config_type(), self.config, self.overrides)
        signals = stop_signals_with(cfg.run.stop_signals, self.requeue_signal)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, stop_signals=tuple(signals)))
        clean = False
        try:
            trainer = Trainer(cfg)
            row = trainer.fit()
            clean = True
        finally:
            distributed.shutdown(clean=clean)  # every rank is past its last collective before a requeue
        if trainer.stopped_by is not None:
            self.after_stop(env, trainer.step, trainer.stopped_by, trainer.signals_seen)
        if env.global_rank == 0:
            print({k: round(v, 5) for k, v in row.items()}, flush=True)
        return row

    def checkpoint(self) -> DelayedSubmission | None:
        """submitit's hook: the job the requeued one runs, or None (no requeue) past ``--max-requeues``."""
        if self.requeues >= self.max_requeues:
            return None
        return DelayedSubmission(dataclasses.replace(self, requeues=self.requeues + 1))

    def after_stop(self, env: JobEnvironment, step: int, stopped_by: str, seen: set[str]) -> NoReturn:
        """The run saved and stopped on ``stopped_by``: global rank 0 requeues the job or says why not; every
        rank then exits with EXIT_STOPPED (the local executor's requeue exits with its own code)."""
        if env.global_rank != 0:
            raise SystemExit(EXIT_STOPPED)
        where = f"stopped at step {step} on {stopped_by}; checkpoint saved"
        # SIGTERM alone is a scancel, which must stay cancelled, or a preemption that Slurm requeues itself
        # (the job is submitted with --requeue); submitit's clusters follow a preemption's SIGTERM with USR2.
        if self.requeue_signal not in (stopped_by, *seen):
            print(
                f"sopvit: {where}; not requeued ({stopped_by} without {self.requeue_signal} is a scancel, "
                "or a preemption Slurm requeues by itself); submit the same command again to continue",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(EXIT_STOPPED)
        if self.checkpoint() is None:
            raise RequeueLimitError(
                f"{where}; not requeued: {self.requeues} requeues reached --max-requeues "
                f"{self.max_requeues}; submit the same command again to continue the run"
            )
        left = self.max_requeues - self.requeues - 1
        print(f"sopvit: {where}; requeueing ({left} requeues left)", file=sys.stderr, flush=True)
        paths = env.paths
        # submitit's own checkpoint step: calls self.checkpoint() and swaps the job's pickle for its result
        job_environment._checkpoint(
            DelayedSubmission.load(paths.submitted_pickle), paths.submitted_pickle, left
        )
        env._requeue(left)  # Slurm: `scontrol requeue`; the local executor exits here with its restart code
        raise SystemExit(EXIT_STOPPED)


def _join_local_group(env: JobEnvironment, requeues: int) -> None:
    """Give the tasks of a multi-task job under submitit's local executor torchrun's variables, which
    ``init_distributed`` reads (under Slurm it reads Slurm's own; a local job has neither)."""
    if env.cluster != "local" or env.num_tasks <= 1 or "WORLD_SIZE" in os.environ:
        return
    os.environ.update(
        RANK=str(env.global_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR="127.0.0.1",
    )
    # A restarted job gets another port: the old one may still be held by the tasks just stopped.
    os.environ.setdefault("MASTER_PORT", str(20000 + (int(env.job_id) * 7 + requeues) % 20000))
