"""What the training step, trainer, checkpoint and bench need from a pre-training method.

A method (SOP, iBOT, DINO) is an ``nn.Module`` whose state (memories, centers, generators) is checkpointed
with the run. Per micro-batch the step asks it which teacher patch tokens need the head
(:meth:`Objective.plan_tokens`), computes the loss from the student's and teacher's head outputs
(:meth:`Objective.compute_loss`), and after the optimizer step hands it the teacher outputs of every
micro-batch (:meth:`Objective.after_update`: memory enqueue, center update). The step never knows which
method runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from sopvit.train.schedules import ScheduleValues


@dataclass
class TokenPlan:
    """Which patch tokens of the 2B teacher global crops go through the head, and the method's own
    bookkeeping for this micro-batch (e.g. SOP's memory keys), handed back with the teacher outputs."""

    teacher: torch.Tensor  # bool (2B, L)
    state: Any = None


@dataclass
class StudentOutputs:
    cls: torch.Tensor  # (C*B, K) head outputs of every crop's [CLS], crop-major [global1, global2, local...]
    tokens: torch.Tensor  # (M, K) head outputs of the M masked patch tokens of the 2B global crops


@dataclass
class TeacherOutputs:
    cls: torch.Tensor  # (2B, K) [global1, global2]
    tokens: torch.Tensor  # (S, K) head outputs of the tokens the plan selected, row-major over (2B, L)
    masks: torch.Tensor  # bool (2B, L): the student's masked tokens (row-major order of StudentOutputs)
    plan: TokenPlan
    ids: torch.Tensor  # (B,) data-set index of each image

    def at_masks(self) -> torch.Tensor:
        """(M, K) teacher outputs at the student's masked positions (the plan must select them)."""
        return self.tokens[self.masks[self.plan.teacher]]


@runtime_checkable
class Objective(Protocol):
    """A pre-training method as the training loop sees it (an ``nn.Module``; its ``state_dict`` is saved)."""

    masks_student: bool  # the student's global crops are masked (masked image modelling)
    head_prototypes: int | None  # a learnable prototype layer of this width ends the head; None: none

    def plan_tokens(self, masks: torch.Tensor) -> TokenPlan:
        """masks: bool (2B, L) of the student's global crops -> the teacher tokens the head must see."""
        ...

    def compute_loss(
        self, student: StudentOutputs, teacher: TeacherOutputs, values: ScheduleValues
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and detached metrics (keys starting with ``loss`` are checked for NaN/Inf)."""
        ...

    def after_update(self, teacher: TeacherOutputs) -> None:
        """Called once per micro-batch, in order, after the optimizer step and the EMA."""
        ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any: ...
