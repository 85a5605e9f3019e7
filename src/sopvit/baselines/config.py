"""Hyper-parameters of the iBOT and DINO baselines (defaults: their ViT-S/16 recipes, METHOD.md)."""

from __future__ import annotations

from dataclasses import dataclass

from sopvit.config.coerce import check


@dataclass
class DINOConfig:
    """DINO (Caron et al., 2021): [CLS] self-distillation onto ``out_dim`` learnable prototypes.

    Temperatures and their warm-up are the run's ``train.teacher_temp`` schedule.
    """

    out_dim: int = 65536
    norm_last_layer: bool = True  # the prototypes' weight-norm magnitude is fixed at 1
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer: float = 1.0  # epochs during which the prototype layer is not updated

    def validate(self) -> None:
        check(self.out_dim >= 2, "out_dim", "must be >= 2")
        check(self.student_temp > 0, "student_temp", "must be > 0")
        check(0 <= self.center_momentum <= 1, "center_momentum", "must be in [0, 1]")
        check(self.freeze_last_layer >= 0, "freeze_last_layer", "must be >= 0 (epochs)")


@dataclass
class IBOTConfig(DINOConfig):
    """iBOT (Zhou et al., 2022): DINO's [CLS] loss plus masked-token self-distillation through the same
    (shared) head; the patch teacher temperature is ``train.patch_teacher_temp`` (null: the [CLS] one)."""

    out_dim: int = 8192
    patch_center_momentum: float = 0.9
    cls_loss_weight: float = 1.0  # iBOT's lambda1
    patch_loss_weight: float = 1.0  # iBOT's lambda2

    def validate(self) -> None:
        super().validate()
        check(0 <= self.patch_center_momentum <= 1, "patch_center_momentum", "must be in [0, 1]")
        check(self.cls_loss_weight >= 0, "cls_loss_weight", "must be >= 0")
        check(self.patch_loss_weight >= 0, "patch_loss_weight", "must be >= 0")
