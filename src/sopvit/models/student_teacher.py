"""Student/teacher encoders with an EMA teacher.

Distributed training wraps only ``student`` in DDP (``DDP(st.student)``); the teacher never receives
gradients, so it stays a plain module updated in place by :meth:`StudentTeacher.update_teacher` on every
rank (all ranks hold identical student weights after the all-reduced step, so teachers stay in sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sopvit.distributed import local_shard
from sopvit.models.backbone import Backbone
from sopvit.models.factory import create_backbone
from sopvit.models.head import ProjectionHead

_EMA_EXCLUDE = ("backbone.mask_token",)


class Encoder(nn.Module):
    """Backbone followed by the projection head, applied once to [CLS] and patch tokens together."""

    def __init__(self, backbone: Backbone, head: ProjectionHead) -> None:
        super().__init__()
        if head.in_dim != backbone.embed_dim:
            raise ValueError(f"head.in_dim={head.in_dim} must equal backbone.embed_dim={backbone.embed_dim}")
        self.backbone = backbone
        self.head = head

    @overload
    def forward(
        self, x: Tensor, mask: Tensor | None = None, select: Tensor | None = None
    ) -> dict[str, Tensor]: ...

    @overload
    def forward(
        self,
        x: Sequence[Tensor],
        mask: Sequence[Tensor | None] | None = None,
        select: Sequence[Tensor | None] | None = None,
    ) -> list[dict[str, Tensor]]: ...

    def forward(
        self, x: Any, mask: Any = None, select: Any = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Encode a batch, or a list of multi-crop batches in one call (one DDP forward per step).

        Args:
            x: images (B, C, H, W), or a list of such batches (e.g. 2 global + n local crops); consecutive
                batches of equal resolution are concatenated and run together.
            mask: bool (B, gh, gw) with ``(gh, gw) = backbone.grid_size((H, W))``, or a list aligned with
                ``x`` whose entries may be ``None`` (no masking for that crop).
            select: which patch tokens go through the head, bool (B, L) (or a list aligned with ``x``;
                ``None`` entries select no token). Without it every token does. The head costs as much as
                a few blocks per token, and SOP only needs the masked tokens, so training selects them.

        Returns:
            dict (a list of dicts for list input) with
            ``cls``: (B, K) unit-norm head output of [CLS]; ``patch``: (B, L, K) unit-norm head outputs of the
            patch tokens, or (M, K) for the M selected tokens (row-major order); ``cls_feat``: (B, D)
            backbone [CLS]; ``patch_feat``: (B, L, D) backbone patches.
        """
        if isinstance(x, Tensor):
            if mask is not None and not isinstance(mask, Tensor):
                raise TypeError(f"mask must be a Tensor or None for tensor input, got {type(mask).__name__}")
            return self._forward_batch(x, mask, select)
        return self._forward_crops(list(x), mask, select)

    def _forward_batch(
        self, x: Tensor, mask: Tensor | None, select: Tensor | None = None
    ) -> dict[str, Tensor]:
        feats = self.backbone(x, mask)
        cls_feat, patch_feat = feats["cls"], feats["patch"]
        if select is None:
            z = self.head(torch.cat([cls_feat.unsqueeze(1), patch_feat], dim=1))
            return {"cls": z[:, 0], "patch": z[:, 1:], "cls_feat": cls_feat, "patch_feat": patch_feat}
        select = select.reshape(patch_feat.shape[:2])
        z = self.head(torch.cat([cls_feat, patch_feat[select]]))
        n = cls_feat.shape[0]
        return {"cls": z[:n], "patch": z[n:], "cls_feat": cls_feat, "patch_feat": patch_feat}

    def _forward_crops(
        self,
        crops: list[Tensor],
        masks: Sequence[Tensor | None] | None,
        select: Sequence[Tensor | None] | None = None,
    ) -> list[dict[str, Tensor]]:
        if not crops or not all(isinstance(c, Tensor) and c.ndim == 4 for c in crops):
            raise ValueError("x must be a non-empty sequence of (B, C, H, W) tensors")
        mask_list: list[Tensor | None] = [None] * len(crops) if masks is None else list(masks)
        if len(mask_list) != len(crops):
            raise ValueError(f"mask has {len(mask_list)} entries for {len(crops)} crops")
        if select is not None and len(select) != len(crops):
            raise ValueError(f"select has {len(select)} entries for {len(crops)} crops")
        outputs: list[dict[str, Tensor]] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[1:] == crops[start].shape[1:]:
                end += 1
            group = crops[start:end]
            mask = self._group_mask(group, mask_list[start:end])
            sizes = [c.shape[0] for c in group]
            if select is None:
                out = self._forward_batch(torch.cat(group), mask)
                chunks = {k: v.split(sizes) for k, v in out.items()}
            else:
                chosen = [self._crop_select(c, s) for c, s in zip(group, select[start:end])]
                out = self._forward_batch(torch.cat(group), mask, torch.cat(chosen))
                token_counts = [int(s.sum()) for s in chosen]
                chunks = {k: v.split(token_counts if k == "patch" else sizes) for k, v in out.items()}
            outputs.extend({k: chunks[k][i] for k in chunks} for i in range(len(sizes)))
            start = end
        return outputs

    def _crop_select(self, crop: Tensor, select: Tensor | None) -> Tensor:
        """(B, L) token selection of one crop; ``None`` selects nothing."""
        if select is not None:
            return select.reshape(crop.shape[0], -1)
        grid = self.backbone.grid_size((crop.shape[-2], crop.shape[-1]))
        return torch.zeros(crop.shape[0], grid[0] * grid[1], dtype=torch.bool, device=crop.device)

    def _group_mask(self, crops: list[Tensor], masks: list[Tensor | None]) -> Tensor | None:
        """Concatenated (sum B, gh, gw) mask of equal-resolution crops; unmasked crops get all-False."""
        if all(m is None for m in masks):
            return None
        grid = self.backbone.grid_size((crops[0].shape[-2], crops[0].shape[-1]))
        filled = [
            torch.zeros(c.shape[0], *grid, dtype=torch.bool, device=c.device) if m is None else m
            for c, m in zip(crops, masks)
        ]
        return torch.cat(filled)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


class StudentTeacher(nn.Module):
    """Holds ``student`` and its EMA ``teacher`` (frozen, always in eval mode).

    Not callable itself: call ``student``/``teacher`` (the training code wraps ``student`` in DDP).
    """

    def __init__(self, student: Encoder, teacher: Encoder) -> None:
        super().__init__()
        s_shapes = {k: v.shape for k, v in student.state_dict().items()}
        t_shapes = {k: v.shape for k, v in teacher.state_dict().items()}
        if s_shapes != t_shapes:
            diff = sorted(set(s_shapes.items()) ^ set(t_shapes.items()))[:5]
            raise ValueError(f"student and teacher must have identical parameters; differences: {diff}")
        self.student = student
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self._ema_cache: tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]] | None = None

    def compile_blocks(self) -> None:
        """``train.compile``: both encoders' transformer blocks (see :meth:`Backbone.compile_blocks`)."""
        for encoder in (self.student, self.teacher):
            encoder.backbone.compile_blocks()

    @classmethod
    def create(
        cls,
        arch: str,
        img_size: int | None = None,
        in_chans: int = 3,
        drop_path_rate: float = 0.1,
        head_hidden: int = 2048,
        head_bottleneck: int = 256,
        head_layers: int = 3,
        head_prototypes: int | None = None,
        norm_last_layer: bool = True,
        **overrides: Any,
    ) -> StudentTeacher:
        """Build student (with ``drop_path_rate``) and a teacher with identical weights and no drop path.

        ``head_prototypes``/``norm_last_layer``: the head's learnable prototype layer (iBOT, DINO; see
        :class:`ProjectionHead`). ``overrides`` go to :func:`~sopvit.models.factory.create_backbone` (e.g.
        ``patch_size``).
        """

        def build(rate: float) -> Encoder:
            backbone = create_backbone(arch, img_size, in_chans, rate, **overrides)
            head = ProjectionHead(
                backbone.embed_dim,
                head_hidden,
                head_bottleneck,
                head_layers,
                n_prototypes=head_prototypes,
                norm_last_layer=norm_last_layer,
            )
            return Encoder(backbone, head)

        student = build(drop_path_rate)
        # timm fixes DropPath rates at construction, so the teacher is built anew rather than deep-copied.
        teacher = build(0.0)
        teacher.load_state_dict(student.state_dict())
        return cls(student, teacher)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("StudentTeacher is a container: call .student(...) or .teacher(...)")

    def train(self, mode: bool = True) -> StudentTeacher:
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> StudentTeacher:
        # .to()/.cuda()/.half() may swap parameter tensors, invalidating the cached EMA lists.
        self._ema_cache = None
        super()._apply(fn, recurse)
        return self

    def ema_parameter_names(self) -> list[str]:
        """Names (relative to an Encoder) of the parameters averaged by :meth:`update_teacher`."""
        return [n for n, _ in self.teacher.named_parameters() if n not in _EMA_EXCLUDE]

    def _ema_lists(self) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
        if self._ema_cache is None:
            student = _unwrap(self.student)
            s_params = dict(student.named_parameters())
            names = self.ema_parameter_names()
            t_params = dict(self.teacher.named_parameters())
            s_buffers = dict(student.named_buffers())
            buffers = [(t, s_buffers[n]) for n, t in self.teacher.named_buffers() if n in s_buffers]
            self._ema_cache = ([t_params[n] for n in names], [s_params[n] for n in names], buffers)
        return self._ema_cache

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """In place ``teacher = momentum * teacher + (1 - momentum) * student`` (mask token excluded);
        buffers are copied from the student."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        t_params, s_params, buffers = self._ema_lists()
        if momentum < 1.0:
            # Local shards under FSDP: a teacher shard lies on the rank of its student shard.
            torch._foreach_lerp_(
                [local_shard(t) for t in t_params], [local_shard(s) for s in s_params], 1.0 - momentum
            )
        for t_buf, s_buf in buffers:
            t_buf.copy_(s_buf)

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Copy every student weight into the teacher (e.g. after loading a student checkpoint)."""
        self.teacher.load_state_dict(_unwrap(self.student).state_dict())

    def teacher_backbone_state_dict(self) -> dict[str, Tensor]:
        """Teacher backbone weights (detached copies) with timm's keys: they load strictly into
        ``timm.create_model(backbone.timm_name, **backbone.timm_kwargs)``."""
        return {k: v.detach().clone() for k, v in self.teacher.backbone.model.state_dict().items()}

    def parameters_to_train(self) -> Iterator[nn.Parameter]:
        """Student parameters that receive gradients."""
        return (p for p in _unwrap(self.student).parameters() if p.requires_grad)
