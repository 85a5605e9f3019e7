"""Spawned gloo ranks for tests: met through a file, so no TCP port is raced for on a busy machine."""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, store: str, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    faulthandler.enable()  # a fatal signal in a rank prints every thread's Python stack
    # One thread per rank: two ranks share this machine's cores with a single-threaded reference.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ok = False
    try:
        fn(rank, *args)
        ok = True
    finally:
        if ok:
            dist.barrier()  # nobody tears down its group while another rank is still in a collective
        dist.destroy_process_group()
    # The rank's work is done and its group left. Twice on a loaded machine a rank of an FSDP test died
    # of SIGABRT ("terminate called without an active exception"), not reproduced in 50 runs since; the
    # cause is not pinned down. An FSDP run leaves 8 autograd device threads running that a DDP run does
    # not, and C++ threads alive at interpreter finalization are the usual source of that message. So
    # the rank exits without finalizing: the test judges what it computed, not how the interpreter
    # unwinds, and an abort before this point still fails the test, with its stacks (faulthandler).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo_ranks(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Call ``fn(rank, *args)`` in ``world`` spawned processes joined in one gloo group.

    Every rank leaves the group cleanly; an exception in any rank fails the caller.
    """
    with tempfile.TemporaryDirectory() as scratch:
        store = str(Path(scratch) / "gloo-store")
        mp.start_processes(
            _rank_main, args=(world, store, fn, args), nprocs=world, start_method="spawn", join=True
        )
