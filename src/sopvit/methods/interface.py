"""What the training step, trainer, checkpoint, gallery and bench need from a pre-training method.

A method (SOP, iBOT, DINO) is an ``nn.Module`` whose state (memories, centers, generators) is checkpointed
with the run. Per micro-batch the step asks it which teacher patch tokens need the head
(:meth:`Objective.plan_tokens`), computes the loss from the student's and teacher's head outputs
(:meth:`Objective.compute_loss`), and after the optimizer step hands it the teacher outputs of the step's
micro-batches (:meth:`Objective.after_update`: memory enqueue, center update). The step never knows which
method runs. Everything else the code must know about a method (its config section, its head, what is
frozen, which settings fix tensor shapes, what its prototype gallery shows) is in its :class:`MethodSpec`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class ScheduleValues:
    """The scheduled values of one step (iteration-indexed; ``train.schedules`` computes them)."""

    step: int  # the optimizer step these values are for (every micro-batch of a step gets the same)
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    patch_teacher_temp: float


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

    def plan_tokens(self, masks: torch.Tensor) -> TokenPlan:
        """masks: bool (2B, L) of the student's global crops -> the teacher tokens the head must see."""
        ...

    def compute_loss(
        self, student: StudentOutputs, teacher: TeacherOutputs, values: ScheduleValues
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and detached metrics (keys starting with ``loss`` are checked for NaN/Inf)."""
        ...

    def after_update(self, teachers: Sequence[TeacherOutputs]) -> None:
        """Called once per step, after the optimizer step and the EMA, with the teacher outputs of each of its
        micro-batches in order. State that follows the global batch (a centre) is updated once from all of
        them, so J accumulated micro-batches update it as J ranks of one micro-batch each would."""
        ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any: ...


@dataclass(frozen=True)
class HeadPrototypes:
    """A learnable prototype layer (weight-normalised linear, ``head.last_layer``) ending the head."""

    count: int
    norm_last_layer: bool = True  # the prototypes' weight-norm magnitude is fixed at 1


# What `sopvit visualize prototypes` can draw for a method: "memory": anchors of the [CLS] memory with
# their supports (the memory is in the objective's state); "head": the head's learned prototypes with
# their top training images; None: the method has no prototypes to show.
Gallery = Literal["memory", "head"] | None


def _no_head(section: Any) -> HeadPrototypes | None:
    return None


def _nothing_frozen(section: Any) -> Mapping[str, float]:
    return {}


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method registry: everything outside the objective that depends on the method.

    ``config`` is the dataclass of the method's config section (``PretrainConfig.<name>``, validated by its
    own ``validate()``); ``build(section, dim)`` makes the objective for head outputs of width ``dim``
    (``model.head_bottleneck_dim``, or the prototype count when the head ends in prototypes).
    """

    name: str
    display_name: str
    config: type
    build: Callable[[Any, int], Objective]
    head: Callable[[Any], HeadPrototypes | None] = _no_head
    # student parameter-name prefix -> epochs during which those parameters get no update
    frozen: Callable[[Any], Mapping[str, float]] = _nothing_frozen
    shape_keys: tuple[str, ...] = ()  # keys of the section that fix tensor shapes (resume must match)
    gallery: Gallery = None
    # (section, model.head_bottleneck_dim) -> raises ConfigError when they cannot go together
    check_head: Callable[[Any, int], None] | None = None
