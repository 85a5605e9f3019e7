"""How the student and teacher lie over the ranks: whole on every rank (DDP) or sharded (FSDP2).

The one place that knows which mode runs (``train.parallel``). The step asks it for the student to call
and for a context that holds gradient synchronisation back until the last micro-batch; checkpoints go
through ``torch.distributed.checkpoint.state_dict``, which reads either layout. Everything else (the
objective, the memories, the EMA, clipping) works on whatever tensors the modules hold: local shards
under FSDP, full tensors under DDP.

Order of the wrappers, as in torchtitan: activation checkpointing, then compile, then sharding, so
each sharded unit holds a compiled block whose activations are recomputed in backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sopvit.models import StudentTeacher
from sopvit.recipe.config import TrainConfig

# Encoders return dicts holding slices of one tensor; nothing modifies them in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


class Parallel(Protocol):
    student: nn.Module  # what the step calls: the student, wrapped when its mode needs it
    sharded_checkpoints: bool  # checkpoints as DCP directories (one file per rank) or one file

    def accumulate(self, last: bool) -> AbstractContextManager[None]:
        """Context for one micro-batch's forward and backward: gradients are synchronised only when
        ``last``."""
        ...


class Replicated:
    """Every rank holds the whole student and teacher; DDP all-reduces gradients when world > 1."""

    sharded_checkpoints = False

    def __init__(self, model: StudentTeacher, device: torch.device, world: int) -> None:
        self.student: nn.Module = model.student
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.student = DistributedDataParallel(model.student, device_ids=ids)

    @contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        no_sync = getattr(self.student, "no_sync", None)  # DDP's; a bare module syncs nothing
        if last or no_sync is None:
            yield
        else:
            with no_sync():
                yield


class Sharded:
    """FSDP2: each transformer block (Swin: stage), each backbone and each encoder is a ``fully_shard``
    unit, student and teacher on one device mesh, so a teacher shard lies on the rank of its student
    shard and the EMA needs no communication. Parameters are gathered for a unit's forward and freed
    after it (the teacher's too); the memory banks stay whole beside them.

    Mixed precision is FSDP's: bf16 parameters for compute when the run is bf16, gradients reduced in
    float32 (the sharded master weights stay float32).
    """

    sharded_checkpoints = True

    def __init__(
        self, model: StudentTeacher, device: torch.device, world: int, param_dtype: torch.dtype | None
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # The device type is explicit: a gloo group on a machine with GPUs must keep parameters on the
        # CPU (pytorch issue 132471).
        mesh = init_device_mesh(device.type, (world,))
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for encoder in (model.student, model.teacher):
            # The backbone is a unit of its own so it can run alone (the online k-NN calls it).
            for unit in [*encoder.backbone.shard_units(), encoder.backbone, encoder]:
                fully_shard(unit, mesh=mesh, mp_policy=policy)
        # FSDP keeps a root's parameters gathered after its forward, for the backward that follows; the
        # teacher has no backward, and its EMA update needs it sharded like the student.
        model.teacher.register_forward_hook(lambda module, args, out: module.reshard())
        self.student: nn.Module = model.student

    @contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        self.student.set_requires_gradient_sync(last)  # type: ignore[operator]
        yield


def prepare(
    model: StudentTeacher, train: TrainConfig, device: torch.device, world: int, bf16: bool
) -> Parallel:
    """Apply ``train``'s activation checkpointing, compile and parallel mode to ``model``, in that order.

    One process with ``parallel=fsdp`` has nothing to shard: it runs replicated but still writes
    sharded checkpoints, so the run can continue on more ranks.
    """
    if train.activation_checkpointing:
        model.student.backbone.set_grad_checkpointing(True)  # the teacher keeps no activations
    if train.compile:
        model.compile_blocks()
    if train.parallel == "fsdp" and world > 1:
        return Sharded(model, device, world, torch.bfloat16 if bf16 else None)
    replicated = Replicated(model, device, world)
    replicated.sharded_checkpoints = train.parallel == "fsdp"
    return replicated
