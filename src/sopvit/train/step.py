"""One SOP optimisation step: teacher targets, student outputs, the objective, the update."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sopvit.device import autocast
from sopvit.distributed import all_reduce_min
from sopvit.models import StudentTeacher
from sopvit.sop import SOPObjective
from sopvit.train.inputs import Batch
from sopvit.train.optim import clip_per_parameter
from sopvit.train.schedules import ScheduleValues


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the loss term."""


@dataclass
class StepContext:
    model: StudentTeacher
    student: nn.Module  # model.student, wrapped in DDP when distributed
    objective: SOPObjective
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast_dtype: torch.dtype | None
    clip_grad: float
    on_nan: str  # "stop" | "skip"

    def autocast(self) -> AbstractContextManager[object]:
        return autocast(self.device, "fp32" if self.autocast_dtype is None else "bf16")


def _check_finite(metrics: dict[str, torch.Tensor]) -> str | None:
    """Name of the first loss term that is non-finite on any rank, or None.

    Every rank must agree to skip or stop: a rank that skips its backward would leave the others waiting
    in DDP's all-reduce. Costs one host sync per micro-batch.
    """
    terms = [k for k in metrics if k.startswith("loss")]
    finite = all_reduce_min(torch.stack([metrics[k] for k in terms]).isfinite().int()).tolist()
    bad = [k for k, ok in zip(terms, finite) if not ok and k != "loss"]
    if all(finite):
        return None
    return bad[0] if bad else "loss"


def train_step(
    ctx: StepContext, batches: list[Batch], values: ScheduleValues, step: int
) -> dict[str, torch.Tensor]:
    """Accumulate gradients over ``batches`` (micro-batches), then clip, update and move the teacher.

    Returns detached metrics averaged over micro-batches, or ``{"skipped": 1}`` when a non-finite loss
    made the step skip (``on_nan="skip"``); raises :class:`NonFiniteLossError` with ``on_nan="stop"``.
    Nothing from a non-finite micro-batch reaches the weights or the memories.
    """
    totals: dict[str, torch.Tensor] = {}
    pending_memory = []
    for i, batch in enumerate(batches):
        crops = [c.to(ctx.device, non_blocking=True) for c in batch.crops]
        masks = batch.masks.to(ctx.device, non_blocking=True).flatten(1)  # (2B, L)
        b = crops[0].shape[0]
        last = i == len(batches) - 1
        sync = (
            nullcontext()
            if last or not isinstance(ctx.student, DistributedDataParallel)
            else ctx.student.no_sync()
        )
        # Only masked tokens (student and teacher) and one memory key per image (teacher) need the head.
        keys = torch.zeros_like(masks)
        keys[torch.arange(b, 2 * b), ctx.objective.memory_tokens(b, masks.shape[1]).to(ctx.device)] = True
        teacher_select = masks | keys
        with sync, ctx.autocast():
            with torch.no_grad():
                teacher = ctx.model.teacher(torch.cat(crops[:2]), select=teacher_select)
            student = ctx.student(
                crops,
                [masks[:b], masks[b:]] + [None] * (len(crops) - 2),
                select=[masks[:b], masks[b:]] + [None] * (len(crops) - 2),
            )
            loss, metrics = ctx.objective.loss(
                student_cls=torch.cat([s["cls"] for s in student]),
                teacher_cls=teacher["cls"],
                student_tokens=torch.cat([student[0]["patch"], student[1]["patch"]]),
                teacher_tokens=teacher["patch"][masks[teacher_select]],
                token_image=masks.nonzero()[:, 0],
                n_images=2 * b,
                teacher_temp=values.teacher_temp,
                patch_teacher_temp=values.patch_teacher_temp,
            )
            bad = _check_finite(metrics)
            if bad is not None:
                ctx.optimizer.zero_grad(set_to_none=True)
                if ctx.on_nan == "skip":
                    return {"skipped": torch.ones(())}
                raise NonFiniteLossError(
                    f"step {step}: {bad} is non-finite (NaN or Inf). The run stopped before the "
                    "update; the last checkpoint is intact. Lower train.lr, raise train.warmup_epochs or set "
                    "train.on_nan=skip."
                )
            (loss / len(batches)).backward()
        memory_keys = teacher["patch"][keys[teacher_select]]
        pending_memory.append((teacher["cls"].detach(), memory_keys.detach(), batch.ids.to(ctx.device)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0) + v / len(batches)

    params = [p for p in ctx.model.student.parameters() if p.grad is not None]
    clip_per_parameter(params, ctx.clip_grad)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.model.update_teacher(values.momentum)
    for cls, patch, ids in pending_memory:
        ctx.objective.update_memory(cls, patch, ids)
    return totals
