"""Stopping a run cleanly when the cluster (or a user) asks it to.

Slurm sends SIGTERM (or the ``--signal`` a job asked for, e.g. USR1 before the time limit) and kills the job
a grace period later; torchrun forwards SIGTERM to its workers and kills them 30 s later. A handler that
saved on the spot would save in the middle of an optimizer step, and a rank that saved alone would wait
forever in a collective its peers never join. So the handler only records the signal; at the next step
boundary the ranks agree (a signal may reach only some of them) and the trainer saves and returns.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch

from sopvit import distributed as dist
from sopvit.recipe.config import signal_number

logger = logging.getLogger(__name__)

# sysexits' EX_TEMPFAIL: "a temporary failure; the user is invited to retry" - the same command continues.
EXIT_STOPPED = 75
STOPS_FILE = "stops.jsonl"


class StopSignals:
    """While entered, the listed signals are recorded instead of ending the process.

    Outside the main thread Python cannot install handlers: nothing is caught there (a trainer run from a
    thread keeps the process's own handling). Handlers in place before are restored on exit.
    """

    def __init__(self, names: tuple[str, ...] | list[str]) -> None:
        self.numbers = tuple(dict.fromkeys(signal_number(n) for n in names))
        self.received: int | None = None
        self.seen: set[str] = set()  # every caught signal's name (a preemption may send two)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.numbers:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number: int, frame: FrameType | None) -> None:
        self.seen.add(signal.Signals(number).name)
        if self.received is None:
            self.received = number
            logger.warning("%s received: stopping at the end of this step", signal.Signals(number).name)
        else:  # the save of the first one is on its way: a second signal must not cut it short
            logger.warning("%s received again: already stopping", signal.Signals(number).name)

    def agreed(self) -> str | None:
        """The signal any rank received (the same name on every rank), or None. A collective: every rank
        calls it at the same step boundary."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64)
        number = int(dist.all_reduce_max(flag).item())
        return signal.Signals(number).name if number else None


def record_stop(run_dir: Path, step: int, reason: str) -> None:
    """Append why this process stopped to ``run_dir/stops.jsonl`` (one line per job, rank 0 only)."""
    if not dist.is_main_process():
        return
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "reason": reason,
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "restart": int(
            os.environ.get("SLURM_RESTART_COUNT", os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        ),
        "host": socket.gethostname(),
    }
    try:
        with open(run_dir / STOPS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as err:  # a full disk must not hide the reason the run stopped
        logger.warning("could not record the stop in %s: %s", run_dir / STOPS_FILE, err)
