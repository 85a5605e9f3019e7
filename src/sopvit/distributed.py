"""Thin helpers over ``torch.distributed`` shared by the method and the trainer.

Every helper degrades to the single-process answer when no process group is active, so the
same code runs under ``python`` and under ``torchrun``.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Renamed in torch 2.14; older releases (down to our floor, 2.6) only have the old name.
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def _collective_device(x: torch.Tensor) -> torch.device:
    """Where ``x`` must live for a collective: NCCL only moves CUDA tensors, gloo moves any."""
    if x.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


@torch.no_grad()
def all_gather_rows(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
    """Concatenate ``x`` (n_r, ...) from every rank in rank order -> (sum_r n_r, ...).

    Ranks may hold different row counts (a short last batch): counts are exchanged first and
    rows padded to the largest count, because the collectives need equal shapes. Callers that
    know the counts agree pass ``same_size=True`` and save that exchange (and its host sync).
    """
    if world_size() == 1:
        return x
    home = x.device
    x = x.to(_collective_device(x))
    if same_size:
        out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
        _gather_single(out, x.contiguous())
        return out.to(home)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    largest = max(sizes)
    padded = x
    if x.shape[0] < largest:
        padded = torch.cat([x, x.new_zeros((largest - x.shape[0], *x.shape[1:]))])
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)]).to(home)


def shard(n: int) -> range:
    """This rank's strided share of ``n`` items: r, r + W, ... (shares differ in size by at most one)."""
    return range(rank(), n, world_size())


def gather_shards(local: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of every rank's ``shard(n)`` (in shard order) -> all ``n`` rows in item order, on every rank."""
    gathered = all_gather_rows(local)
    if world_size() == 1:
        return gathered
    # gathered rows are rank-major; row i of rank r is item r + i * W
    order = torch.cat([torch.arange(r, n, world_size()) for r in range(world_size())]).to(gathered.device)
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out


def init_distributed(device_type: str) -> torch.device:
    """Join the process group described by torchrun's environment, or by Slurm's under ``srun`` (one task
    per GPU, no torchrun), if any; return this rank's device.

    NCCL on GPUs, gloo on CPUs. Without either launcher's variables this is a no-op.
    """
    adopt_slurm_env(os.environ)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_distributed():
        timeout = timedelta(seconds=int(os.environ.get("SOPVIT_DIST_TIMEOUT", 600)))
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _restart_scoped_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return device


def adopt_slurm_env(env: MutableMapping[str, str]) -> None:
    """Under ``srun`` without torchrun, spell Slurm's task variables the way torchrun does.

    The rendezvous host is the step's first node and the port follows the job id, so every task of a job
    (and of its requeued run) computes the same address without talking first. ``MASTER_ADDR`` and
    ``MASTER_PORT`` already set win. The step's task count (``SLURM_STEP_NUM_TASKS``) is preferred to the
    job's, so ``srun --ntasks 2`` inside a larger allocation forms a group of 2.
    """
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return
    world = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    if int(world) <= 1:
        return
    nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", ""))
    if not nodes:
        raise RuntimeError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot find the first node")
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], world
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", first_host(nodes))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-006,9],cpu1`` -> ``gpu003``."""
    out, depth, bracket = [], 0, ""
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        if ch == "[":
            depth, bracket = 1, ""
        elif ch == "]":
            out.append(bracket.split(",")[0].split("-")[0])
            depth = 0
        elif depth:
            bracket += ch
        else:
            out.append(ch)
    return "".join(out)


def _restart_scoped_store(timeout: timedelta) -> dist.Store | None:
    """After a torchrun restart, a key space of its own in the agent's store.

    The agent keeps its TCP store across ``--max-restarts``; without a fresh prefix the new workers read
    the dead workers' gloo addresses and fail with "Connection refused".
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"sopvit/restart{restart}", client)


def all_gather_objects(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (small host objects such as RNG states)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown(clean: bool) -> None:
    """Leave the process group, if any, before the interpreter exits.

    A rank that exits with its group alive tears down gloo's threads and the store client while
    another rank may still be in a collective or mid-teardown: the C++ side then aborts
    ("terminate called without an active exception") after the command succeeded, and torchrun
    reports the run as failed. After a clean run the ranks first agree that all of them are done;
    after an error they only leave, since the others may be gone.
    """
    if not is_distributed():
        return
    try:
        if clean:
            dist.barrier()
    except RuntimeError:
        pass  # another rank failed and left; torchrun reports it, this rank's own work is done
    finally:
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    y = x.to(_collective_device(x), copy=True)
    dist.all_reduce(y)
    return (y / world_size()).to(x.device)


def all_reduce_mean_dict(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average scalar tensors over ranks in one collective (metrics are logged as global means)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    stacked = all_reduce_mean(torch.stack([values[k].float().reshape(()) for k in keys]))
    return dict(zip(keys, stacked.unbind()))


def all_reduce_min(x: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum over ranks (e.g. "is every rank's loss finite?")."""
    return _all_reduce(x, dist.ReduceOp.MIN)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over ranks (e.g. "did any rank receive a stop signal?")."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    if world_size() == 1:
        return x
    y = x.to(_collective_device(x), copy=True)
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def local_shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``x``: the local shard of a DTensor (a parameter or gradient under FSDP), ``x``
    itself otherwise. In-place ops on the result change ``x``."""
    from torch.distributed.tensor import DTensor

    return x.to_local() if isinstance(x, DTensor) else x


def shard_group(tensors: list[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group ``tensors`` are sharded over (FSDP), or None when none is sharded.

    Raises:
        ValueError: some are sharded and some are not (a model sharded in part).
    """
    from torch.distributed.tensor import DTensor

    sharded = [x for x in tensors if isinstance(x, DTensor)]
    if not sharded:
        return None
    if len(sharded) != len(tensors):
        raise ValueError(f"{len(sharded)} of {len(tensors)} tensors are sharded: shard all or none")
    return sharded[0].device_mesh.get_group()
