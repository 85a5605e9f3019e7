"""The network behind an embeddings table: a teacher backbone, and from a training run its projection head.

Features are the evaluators' own (``sopvit.eval.cache``: "cls", "cls+avgpool", "lastN"), so a table's
vectors are the ones k-NN and the linear probe see. The head column is the teacher head's normalised
bottleneck of the [CLS] feature: the space SOP's [CLS] memory rows and iBOT/DINO's prototype vectors live
in, which is what ``sopvit prototypes assign`` compares.

A table names its backbone by :func:`backbone_fingerprint`, the fingerprint of the timm model alone: the
mask token is training-only and an export does not carry it (loading one draws it at random), so hashing
it would give a run and its export, or two loads of one export, different names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sopvit.device import autocast
from sopvit.eval.cache import layer_features
from sopvit.explore.table import TableMeta, fingerprint
from sopvit.export.load import load_pretrained, load_teacher_encoder
from sopvit.models import Backbone
from sopvit.models.head import ProjectionHead

FEATURE = re.compile(r"^(cls|cls\+avgpool|last[1-9][0-9]*)$")


def backbone_fingerprint(backbone: Backbone) -> str:
    """:func:`~sopvit.explore.table.fingerprint` of the timm model (the weights an export holds)."""
    return fingerprint(backbone.model)


def bottleneck_dim(head: ProjectionHead) -> int:
    layer = head.mlp[-1]
    if not isinstance(layer, nn.Linear):  # ProjectionHead's MLP ends in its bottleneck Linear
        raise TypeError(
            f"the projection head's MLP ends in {type(layer).__name__}, not its bottleneck Linear"
        )
    return layer.out_features


def head_space(head: ProjectionHead, cls: Tensor) -> Tensor:
    """(B, K) float32 unit vectors: the head's normalised bottleneck (before iBOT/DINO's prototype layer)."""
    if head.last_layer is None:
        return head(cls)
    return F.normalize(head.mlp(cls).float(), dim=-1, eps=head.eps)


@dataclass
class Embedder:
    backbone: Backbone
    head: ProjectionHead | None  # None for an export: it has no projection head
    source: str

    @property
    def image_size(self) -> int:
        """The resolution the backbone was built for (its position embeddings' grid)."""
        size = getattr(self.backbone.model.patch_embed, "img_size", None) or (224, 224)
        return int(size[0])

    @property
    def in_chans(self) -> int:
        return int(getattr(self.backbone.model.patch_embed.proj, "in_channels", 3))

    def check_feature(self, feature: str) -> None:
        if not FEATURE.match(feature):
            raise ValueError(f"--feature must be cls, cls+avgpool or lastN (e.g. last4), got {feature!r}")
        blocks = getattr(self.backbone.model, "blocks", None)
        if feature.startswith("last") and (blocks is None or int(feature[4:]) > len(blocks)):
            have = "no ViT blocks" if blocks is None else f"{len(blocks)} blocks"
            raise ValueError(f"--feature {feature} needs {feature[4:]} ViT blocks; this backbone has {have}")

    def meta(self, feature: str, normalized: bool, dtype: str, image_size: int) -> TableMeta:
        width = {"cls": 1, "cls+avgpool": 2}.get(feature) or int(feature[4:])
        return TableMeta(
            backbone=self.backbone.arch or self.backbone.timm_name or type(self.backbone.model).__name__,
            fingerprint=backbone_fingerprint(self.backbone),
            source=self.source,
            feature=feature,
            normalized=normalized,
            dim=width * self.backbone.embed_dim,
            dtype=dtype,
            image_size=image_size,
            head_dim=None if self.head is None else bottleneck_dim(self.head),
        )

    def to(self, device: torch.device) -> Embedder:
        self.backbone.eval().requires_grad_(False).to(device)
        if self.head is not None:
            self.head.eval().requires_grad_(False).to(device)
        return self

    @torch.inference_mode()
    def features(self, x: Tensor, feature: str, normalize: bool) -> tuple[Tensor, Tensor | None]:
        """(B, dim) features of normalised images (raw, or L2-normalised as a whole), and the (B, K) head
        vectors of their [CLS] feature (None without a head), float32 on the CPU."""
        device = next(self.backbone.parameters()).device
        with autocast(device):  # bf16 on CUDA, float32 on the CPU: the evaluators' precision
            out = layer_features(self.backbone, x.to(device, non_blocking=True), feature).float()
            head = None
            if self.head is not None:
                # "lastN" ends with the last block's [CLS] after the final norm, "cls+avgpool" starts with it
                width = self.backbone.embed_dim
                cls = out[:, -width:] if feature.startswith("last") else out[:, :width]
                head = head_space(self.head, cls).float().cpu()
        if normalize:
            out = F.normalize(out, dim=-1)
        return out.cpu(), head


def load_embedder(checkpoint: str | Path) -> Embedder:
    """Backbone + head of a run directory or its checkpoint (``checkpoint.pt``, or the sharded
    ``checkpoint-NNNNNN`` directory of an FSDP run, gathered here); backbone alone of an export."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint} does not exist: pass a run directory, its checkpoint.pt or "
            "checkpoint-NNNNNN directory, or an export"
        )
    source = str(path.resolve())
    try:
        encoder = load_teacher_encoder(path, "the head column")
    except ValueError:  # an export or a bare state dict: no head, and load_pretrained explains what it is
        return Embedder(load_pretrained(path), None, source)
    return Embedder(encoder.backbone, encoder.head, source)
