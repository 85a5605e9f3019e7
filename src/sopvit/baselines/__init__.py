"""Building blocks of the DINO and iBOT baselines (losses and centre update as pure tensor functions)."""

from sopvit.baselines.losses import cls_distillation_loss, masked_patch_distillation_loss, updated_center

__all__ = ["cls_distillation_loss", "masked_patch_distillation_loss", "updated_center"]
