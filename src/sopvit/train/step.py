"""One optimisation step of any pre-training method: teacher targets, student outputs, the objective's
loss, the update, then the objective's own update (memories, centers)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from sopvit.data.pipeline import Batch
from sopvit.device import autocast
from sopvit.distributed import all_reduce_min
from sopvit.methods.interface import Objective, ScheduleValues, StudentOutputs, TeacherOutputs
from sopvit.models import StudentTeacher
from sopvit.optim.groups import clip_per_parameter
from sopvit.train.parallel import Parallel


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the loss term."""


@dataclass
class StepContext:
    model: StudentTeacher
    parallel: Parallel  # the student to call (wrapped by its parallel mode) and gradient sync
    objective: Objective
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast_dtype: torch.dtype | None
    clip_grad: float
    on_nan: str  # "stop" | "skip"
    # student parameter-name prefix -> the step before which those parameters get no update (the method's
    # MethodSpec.frozen, e.g. DINO's and iBOT's prototype layer while the rest settles)
    frozen: Mapping[str, int] = field(default_factory=dict)

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
    pending: list[TeacherOutputs] = []
    for i, batch in enumerate(batches):
        crops = [c.to(ctx.device, non_blocking=True) for c in batch.crops]
        masks = batch.masks.to(ctx.device, non_blocking=True).flatten(1)  # (2B, L)
        if not ctx.objective.masks_student:
            masks = torch.zeros_like(masks)
        b = crops[0].shape[0]
        last = i == len(batches) - 1
        # Only the tokens the method asks for go through the head: the head costs a few blocks per token.
        plan = ctx.objective.plan_tokens(masks)
        global_masks = [masks[:b], masks[b:]] + [None] * (len(crops) - 2)
        with ctx.parallel.accumulate(last), ctx.autocast():
            with torch.no_grad():
                out = ctx.model.teacher(torch.cat(crops[:2]), select=plan.teacher)
            teacher = TeacherOutputs(out["cls"], out["patch"], masks, plan, batch.ids.to(ctx.device))
            outs = ctx.parallel.student(crops, global_masks, select=global_masks)
            student = StudentOutputs(
                cls=torch.cat([o["cls"] for o in outs]),
                tokens=torch.cat([outs[0]["patch"], outs[1]["patch"]]),
            )
            loss, metrics = ctx.objective.compute_loss(student, teacher, values)
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
        pending.append(teacher)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0) + v / len(batches)

    params = [p for p in ctx.model.student.parameters() if p.grad is not None]
    clip_per_parameter(params, ctx.clip_grad)
    frozen = tuple(prefix for prefix, until in ctx.frozen.items() if step < until)
    if frozen:
        for name, p in ctx.model.student.named_parameters():
            if name.startswith(frozen):
                p.grad = None
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.model.update_teacher(values.momentum)
    ctx.objective.after_update(pending)
    return totals
