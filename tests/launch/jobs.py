"""Test doubles for ``sopvit submit``: a job that signals itself at a chosen micro-batch, and a fake Slurm.

The signal is sent from inside the run, at a known point, so a busy machine cannot let the run finish before
a signal sent from outside arrives; it still goes through the operating system and the real handlers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sopvit.launch.job import PretrainJob

REPO = Path(__file__).resolve().parents[2]
JOB_ID = "4242"


def signal_at(at: int, name: str) -> None:
    """Send this process the signal ``name`` when the trainer's input stream serves micro-batch ``at``."""
    import sopvit.data.pipeline as pipeline

    batches = pipeline.PretrainInputs.batches

    def signalling(self: Any, start: int, stop: int, device: Any) -> Iterator[Any]:
        for m, batch in enumerate(batches(self, start, stop, device), start):
            if m == at:
                os.kill(os.getpid(), getattr(signal, name))
            yield batch

    pipeline.PretrainInputs.batches = signalling  # type: ignore[method-assign]


@dataclass(frozen=True)
class SignalAtJob(PretrainJob):
    """A PretrainJob whose first run (not the requeued ones) signals itself at micro-batch ``at``, on the
    tasks of ``ranks`` (None: all of them, as Slurm signals a job)."""

    at: int = 0
    signal: str = "SIGUSR2"
    ranks: tuple[int, ...] | None = None

    def __call__(self) -> dict[str, float]:
        from submitit import JobEnvironment

        if self.requeues == 0 and (self.ranks is None or JobEnvironment().global_rank in self.ranks):
            signal_at(self.at, self.signal)
        return super().__call__()


# `srun` as Slurm starts a task, the first time (SLURM_RESTART_COUNT unset) signalling itself at AT.
RUN_AS_SLURM_TASK = """
import os, sys
if "SLURM_RESTART_COUNT" not in os.environ and os.environ.get("AT"):
    from tests.launch.jobs import signal_at
    signal_at(int(os.environ["AT"]), os.environ["SIGNAL"])
from submitit.core.submission import submitit_main
submitit_main()
"""


def fake_slurm(bin_dir: Path, sbatch_exit: int = 0) -> None:
    """``srun`` (present), ``sbatch`` (keeps the script, answers with JOB_ID) and ``scontrol`` (logs its
    arguments) in ``bin_dir``; what they keep lands in ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    answer = (
        f'echo "Submitted batch job {JOB_ID}"'
        if sbatch_exit == 0
        else 'echo "sbatch: error: invalid partition specified: gpux" >&2'
    )
    scripts = {
        "srun": "exit 0",
        "sbatch": f'cp "$1" "{bin_dir}/sbatch_script.sh"\n{answer}\nexit {sbatch_exit}',
        "scontrol": f'echo "$@" >> "{bin_dir}/scontrol.log"',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)


def slurm_task_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """The environment Slurm gives task 0 of a one-task job, with the fake commands first on PATH."""
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        **extra,
    }
