"""The SOP objective: prototypes from both memories, [CLS] and SOP-MIM losses, memory updates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sopvit.distributed import rank, world_size
from sopvit.methods.distill import collapse_metrics
from sopvit.methods.interface import ScheduleValues, StudentOutputs, TeacherOutputs, TokenPlan
from sopvit.methods.sop.config import SOPConfig
from sopvit.methods.sop.losses import assign_to_supports, cross_view_loss, masked_token_loss
from sopvit.methods.sop.memory_bank import MemoryBank
from sopvit.methods.sop.prototypes import Prototypes, build_prototype_tasks


def koleo_loss(z: torch.Tensor) -> torch.Tensor:
    """Kozachenko-Leonenko spreading term on unit-norm rows z (B, d): -mean log(distance to nearest)."""
    with torch.no_grad():
        sims = z @ z.T
        sims.fill_diagonal_(-2.0)
        nearest = sims.argmax(dim=1)
    dist = (z - z[nearest]).float().norm(dim=1)
    return -(dist + 1e-8).log().mean()


def _assign(z: torch.Tensor, prototypes: Prototypes, temperature: float) -> torch.Tensor:
    """(N, K) embeddings -> (T, N, P) assignments to each task's prototypes."""
    return assign_to_supports(
        z, prototypes.supports, prototypes.weights, prototypes.num_prototypes, temperature
    )


class SOPObjective(nn.Module):
    """Loss of one SOP step from student and teacher head outputs (all unit-norm, dim K).

    Holds the [CLS] and patch memories (buffers) and a generator whose state is part of the module
    state: every rank builds the same prototypes, and a resumed run draws the same anchors. Implements
    :class:`sopvit.methods.Objective` for the training loop; :meth:`loss` and :meth:`forward` are the same
    computation on plain tensors.
    """

    masks_student: bool = True
    head_prototypes: int | None = None  # the prototypes come from the memories: no prototype layer

    def __init__(self, cfg: SOPConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = cfg or SOPConfig()
        if overrides:
            cfg = SOPConfig(**{**cfg.__dict__, **overrides})
        if cfg.dim is None:
            raise ValueError(
                "SOPConfig.dim is unset: give the width of the head outputs (in a pre-training config it "
                "follows model.head_bottleneck_dim)"
            )
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.token_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self._step_draw: tuple[int, tuple[Prototypes, Prototypes]] | None = None
        self.cls_bank = MemoryBank(cfg.cls_bank_size, cfg.dim, generator=self.generator)
        self.patch_bank = MemoryBank(cfg.patch_bank_size, cfg.dim, generator=self.generator)
        # Fail at construction, not at the first step, on impossible prototype settings.
        for name, bank, anchors, k, keep in (
            ("cls", self.cls_bank, cfg.cls_anchors, cfg.cls_k, cfg.cls_keep_fraction),
            ("patch", self.patch_bank, cfg.patch_anchors, cfg.patch_k, cfg.patch_keep_fraction),
        ):
            size = bank.embeddings.shape[0]
            # the probe below holds anchors + k rows only: the range is checked against the whole memory
            if not 1 <= anchors <= size:
                raise ValueError(f"{name}_anchors must be in [1, {name}_bank_size={size}], got {anchors}")
            probe = bank.embeddings[: anchors + k]
            try:
                build_prototype_tasks(
                    probe, 1, anchors, k, cfg.smoothing, keep, torch.Generator(), cfg.anchor_selection
                )
            except ValueError as exc:
                raise ValueError(f"{name} prototypes: {exc}") from None

    def _prototypes(self, bank: MemoryBank, tasks: int, anchors: int, k: int, keep: float) -> Prototypes:
        cfg = self.cfg
        return build_prototype_tasks(
            bank.embeddings, tasks, anchors, k, cfg.smoothing, keep, self.generator, cfg.anchor_selection
        )

    def draw_prototypes(self) -> tuple[Prototypes, Prototypes]:
        """New [CLS] and patch prototypes from the memories (anchors drawn from the shared generator)."""
        cfg = self.cfg
        return (
            self._prototypes(self.cls_bank, cfg.cls_tasks, cfg.cls_anchors, cfg.cls_k, cfg.cls_keep_fraction),
            self._prototypes(self.patch_bank, 1, cfg.patch_anchors, cfg.patch_k, cfg.patch_keep_fraction),
        )

    def step_prototypes(self, step: int) -> tuple[Prototypes, Prototypes]:
        """The prototypes of optimizer step ``step``, drawn at its first micro-batch and kept until the step
        or the memories change: J accumulated micro-batches share one draw, as J ranks do, so a run keeps its
        loss when it trades ranks for accumulation."""
        if self._step_draw is None or self._step_draw[0] != step:
            self._step_draw = (step, self.draw_prototypes())
        return self._step_draw[1]

    def forward(
        self,
        student_cls: torch.Tensor,
        teacher_cls: torch.Tensor,
        student_patch: torch.Tensor,
        teacher_patch: torch.Tensor,
        masks: torch.Tensor,
        teacher_temp: float,
        patch_teacher_temp: float | None = None,
        sample_ids: torch.Tensor | None = None,
        update_memory: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and detached metrics, then (by default) the memory update.

        student_cls: (C*B, K) crop-major [global1, global2, local1, ...];
        teacher_cls: (2B, K) [global1, global2];
        student_patch, teacher_patch: (2B, L, K); masks: bool (2B, L) of the student's global crops;
        sample_ids: (B,) data-set index of each image (remembered by the memories).
        """
        if masks.shape != student_patch.shape[:2] or teacher_patch.shape != student_patch.shape:
            raise ValueError(
                f"masks {tuple(masks.shape)}, student_patch {tuple(student_patch.shape)} and teacher_patch "
                f"{tuple(teacher_patch.shape)} must agree as (2B, L) / (2B, L, K)"
            )
        b = teacher_cls.shape[0] // 2
        key_token = self.memory_tokens(b, masks.shape[1]).to(teacher_patch.device)
        loss, metrics = self.loss(
            student_cls,
            teacher_cls,
            student_patch[masks],
            teacher_patch[masks],
            masks.nonzero()[:, 0],
            masks.shape[0],
            teacher_temp,
            patch_teacher_temp,
        )
        if update_memory:
            rows = torch.arange(b, device=teacher_patch.device)
            self.update_memory(teacher_cls, teacher_patch[b:][rows, key_token], sample_ids)
        return loss, metrics

    def loss(
        self,
        student_cls: torch.Tensor,
        teacher_cls: torch.Tensor,
        student_tokens: torch.Tensor,
        teacher_tokens: torch.Tensor,
        token_image: torch.Tensor,
        n_images: int,
        teacher_temp: float,
        patch_teacher_temp: float | None = None,
        prototypes: tuple[Prototypes, Prototypes] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss from the masked tokens only (what training computes the head for).

        student_cls: (C*B, K); teacher_cls: (2B, K); student_tokens, teacher_tokens: (M, K) the masked patch
        tokens of the 2B global images; token_image: (M,) image of each token in [0, n_images = 2B);
        prototypes: the ([CLS], patch) prototypes to assign to (None: :meth:`draw_prototypes`).
        """
        cfg = self.cfg
        b = teacher_cls.shape[0] // 2
        if (
            b == 0
            or teacher_cls.shape[0] != 2 * b
            or student_cls.shape[0] % b
            or student_cls.shape[0] < 2 * b
        ):
            raise ValueError(
                f"expected teacher_cls (2B, K) and student_cls (C*B, K) with C >= 2, got "
                f"{tuple(teacher_cls.shape)} and {tuple(student_cls.shape)}"
            )
        if student_tokens.shape != teacher_tokens.shape or token_image.shape != student_tokens.shape[:1]:
            raise ValueError(
                f"student_tokens {tuple(student_tokens.shape)}, teacher_tokens "
                f"{tuple(teacher_tokens.shape)} and token_image {tuple(token_image.shape)} "
                "must agree as (M, K) / (M,)"
            )
        patch_teacher_temp = teacher_temp if patch_teacher_temp is None else patch_teacher_temp
        cls_protos, patch_protos = self.draw_prototypes() if prototypes is None else prototypes
        with torch.no_grad():
            t_cls = _assign(teacher_cls, cls_protos, teacher_temp)
            t_patch = _assign(teacher_tokens, patch_protos, patch_teacher_temp)[0]
        s_cls = _assign(student_cls, cls_protos, cfg.student_temp)  # (T, C*B, P)
        s_patch = _assign(student_tokens, patch_protos, cfg.student_temp)[0]  # (M, P)
        loss_cls = cross_view_loss(s_cls.split(b, dim=1), t_cls.split(b, dim=1))
        loss_patch = masked_token_loss(s_patch, t_patch, token_image, n_images)

        loss = loss_cls + cfg.patch_loss_weight * loss_patch
        metrics = {"loss_cls": loss_cls.detach(), "loss_patch": loss_patch.detach()}
        if cfg.koleo_weight > 0:
            koleo = koleo_loss(student_cls[: 2 * b])
            loss = loss + cfg.koleo_weight * koleo
            metrics["loss_koleo"] = koleo.detach()
        metrics["loss"] = loss.detach()
        metrics.update(self._assignment_metrics(s_cls[:, : 2 * b].detach(), t_cls, b))
        return loss, metrics

    def plan_tokens(self, masks: torch.Tensor) -> TokenPlan:
        """The masked tokens (patch loss) and one memory key per image of the second view (patch memory).

        masks: bool (2B, L); the plan's state is the (2B, L) memory keys.
        """
        b = masks.shape[0] // 2
        keys = torch.zeros_like(masks)
        keys[torch.arange(b, 2 * b), self.memory_tokens(b, masks.shape[1]).to(masks.device)] = True
        return TokenPlan(teacher=masks | keys, state=keys)

    def compute_loss(
        self, student: StudentOutputs, teacher: TeacherOutputs, values: ScheduleValues
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(
            student_cls=student.cls,
            teacher_cls=teacher.cls,
            student_tokens=student.tokens,
            teacher_tokens=teacher.at_masks(),
            token_image=teacher.masks.nonzero()[:, 0],
            n_images=teacher.masks.shape[0],
            teacher_temp=values.teacher_temp,
            patch_teacher_temp=values.patch_teacher_temp,
            prototypes=self.step_prototypes(values.step),
        )

    def after_update(self, teachers: Sequence[TeacherOutputs]) -> None:
        for teacher in teachers:  # in micro-batch order: the rows J ranks would gather, in rank order
            keys = teacher.plan.state
            self.update_memory(teacher.cls, teacher.tokens[keys[teacher.plan.teacher]], teacher.ids)

    @staticmethod
    def _assignment_metrics(s_glob: torch.Tensor, t_glob: torch.Tensor, b: int) -> dict[str, torch.Tensor]:
        """Collapse diagnostics from (T, 2B, P) student/teacher global assignments."""
        s_arg, t_arg = s_glob.argmax(-1), t_glob.argmax(-1)
        agree = (s_arg == t_arg.roll(b, dims=1)).float().mean()  # student view 1 vs teacher view 2, and back
        return collapse_metrics(t_glob) | {"agreement": agree}

    def memory_tokens(self, b: int, length: int) -> torch.Tensor:
        """(B,) the patch token of each image's second global view that goes to the patch memory.

        Drawn for the global batch from a generator shared by all ranks, each rank taking its slice, so
        that the memory equals the single-process one fed the concatenated batch.
        """
        tokens = torch.randint(length, (b * world_size(),), generator=self.token_generator)
        return tokens[rank() * b : (rank() + 1) * b]

    @torch.no_grad()
    def update_memory(
        self,
        teacher_cls: torch.Tensor,
        teacher_patch_keys: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
    ) -> None:
        """Enqueue the second global view: last B rows of teacher_cls (2B, K); teacher_patch_keys (B, K)."""
        b = teacher_cls.shape[0] // 2
        self._step_draw = None  # drawn from the memories as they were
        self.cls_bank.enqueue(teacher_cls[b:], ids=sample_ids, same_size=True)
        self.patch_bank.enqueue(teacher_patch_keys, ids=sample_ids, same_size=True)

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "token_generator": self.token_generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._step_draw = None
        self.generator.set_state(state["generator"])
        self.token_generator.set_state(state["token_generator"])
