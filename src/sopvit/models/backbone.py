"""Backbone wrapper around a timm ViT or Swin with iBOT-style masked image modelling.

The timm network lives untouched in ``self.model`` so ``backbone.model.state_dict()`` carries exactly timm's
keys; the only extra parameter, the mask token, sits next to it.

Swin has no [CLS] token: ``cls`` is the mean of the final (normed) tokens and ``patch`` are the final
tokens. Masks for Swin are given on the FINAL token grid (``grid_size``, 7x7 at 224 px) because that is
where the patch-level loss is computed; each final-grid cell is expanded (nearest, factor
``2 ** num_downsamples`` = 8 for Swin-T) to the patch-embedding grid (56x56), where the mask token replaces
the embeddings. A masked output token is thus built only from mask tokens at its own 8x8 block of
patch embeddings, the same "predict the hidden patch" task iBOT poses to a ViT.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

BackboneKind = Literal["vit", "swin"]


class Backbone(nn.Module):
    """timm ViT / Swin with a learnable mask token and token-level outputs.

    Args:
        model: a timm ``VisionTransformer`` (with a class token) or ``SwinTransformer``.
        kind: ``"vit"`` or ``"swin"``; must agree with ``model``.
        arch, timm_name, timm_kwargs: provenance, kept so checkpoints can rebuild the bare timm model.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: BackboneKind,
        arch: str | None = None,
        timm_name: str | None = None,
        timm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if kind == "vit":
            if not isinstance(model, VisionTransformer):
                raise TypeError(f"model must be a timm VisionTransformer for kind='vit', got {type(model)}")
            if not model.has_class_token:
                raise ValueError("model must have a class token (class_token=True)")
        elif kind == "swin":
            if not isinstance(model, SwinTransformer):
                raise TypeError(f"model must be a timm SwinTransformer for kind='swin', got {type(model)}")
        else:
            raise ValueError(f"kind must be 'vit' or 'swin', got {kind!r}")
        embed: Any = model.patch_embed
        token_dim = int(embed.proj.out_channels)
        self.model = model
        self.kind: BackboneKind = kind
        self.arch = arch
        self.timm_name = timm_name
        self.timm_kwargs = dict(timm_kwargs or {})
        self.grad_checkpointing = False
        # Dimension of the patch embeddings it replaces (Swin stage 0 is narrower than its output).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, token_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def _timm(self) -> Any:
        # timm's attributes are dynamically typed; routing access through Any keeps mypy useful elsewhere.
        return self.model

    # ----------------------------------------------------------------------------------------- geometry
    @property
    def embed_dim(self) -> int:
        """Width D of the output tokens."""
        return int(self._timm.num_features)

    @property
    def patch_size(self) -> int:
        """Pixel stride of one output token (ViT: patch size; Swin: 4 * 2**num_downsamples = 32)."""
        stride = int(max(self._timm.patch_embed.patch_size))
        return stride * 2 ** self._num_downsamples() if self.kind == "swin" else stride

    @property
    def num_prefix_tokens(self) -> int:
        """Leading non-patch tokens in ``forward_features`` output ([CLS] + registers; Swin: 1 pooled)."""
        return int(self._timm.num_prefix_tokens) if self.kind == "vit" else 1

    def _num_downsamples(self) -> int:
        return sum(not isinstance(layer.downsample, nn.Identity) for layer in self._timm.layers)

    def grid_size(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(gh, gw)`` of the ``patch`` output (and of the mask) for an input of ``img_size``."""
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if h <= 0 or w <= 0:
            raise ValueError(f"img_size must be positive, got {img_size!r}")
        embed = self._timm.patch_embed
        if hasattr(embed, "dynamic_feat_size"):
            gh, gw = embed.dynamic_feat_size((h, w))
        else:
            gh, gw = h // embed.patch_size[0], w // embed.patch_size[1]
        if self.kind == "swin":
            for _ in range(self._num_downsamples()):
                gh, gw = math.ceil(gh / 2), math.ceil(gw / 2)
        return int(gh), int(gw)

    # ------------------------------------------------------------------------------------------ masking
    def _apply_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """Replace patch embeddings by the mask token.

        Args:
            x: patch embeddings, (B, H, W, C) or (B, H*W, C).
            mask: bool, (B, gh, gw) on the output token grid (or flattened (B, gh*gw)).
        """
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
        mask = mask.to(x.device, non_blocking=True)
        batch = x.shape[0]
        if self.kind == "swin":
            h, w = x.shape[1], x.shape[2]
            fh, fw = h, w
            for _ in range(self._num_downsamples()):
                fh, fw = math.ceil(fh / 2), math.ceil(fw / 2)
            mask = self._check_mask(mask, (batch, fh, fw))
            scale = 2 ** self._num_downsamples()
            mask = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)[:, :h, :w]
        else:
            mask = self._check_mask(mask, tuple(x.shape[:-1]))
        return torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)

    @staticmethod
    def _check_mask(mask: Tensor, shape: tuple[int, ...]) -> Tensor:
        if mask.shape == shape:
            return mask
        if mask.shape[0] == shape[0] and mask.numel() == math.prod(shape):
            return mask.reshape(shape)
        raise ValueError(f"mask must have shape {shape} (batch, token grid), got {tuple(mask.shape)}")

    # ---------------------------------------------------------------------------------------- internals
    def _vit_embed(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Same steps as timm ``VisionTransformer.forward_features`` up to the blocks; (B, P+L, D)."""
        m = self._timm
        x = m.patch_embed(x)
        if mask is not None:
            x = self._apply_mask(x, mask)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            out: Tensor = checkpoint(block, x, use_reentrant=False)
            return out
        return block(x)

    def _tokens(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Final-normed tokens: ViT (B, P+L, D) as timm; Swin (B, h, w, D)."""
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        m = self._timm
        if self.kind == "swin":
            x = m.patch_embed(x)
            if mask is not None:
                x = self._apply_mask(x, mask)
            return m.norm(m.layers(x))
        x = self._vit_embed(x, mask)
        for block in m.blocks:
            x = self._run_block(block, x)
        return m.norm(x)

    def _split(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind == "swin":
            patch = tokens.flatten(1, 2)
            return patch.mean(dim=1), patch
        return tokens[:, 0], tokens[:, self.num_prefix_tokens :]

    # ------------------------------------------------------------------------------------------- public
    def forward(self, x: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Encode images, optionally with masked patches (iBOT MIM).

        Args:
            x: images, (B, C, H, W).
            mask: optional bool (B, gh, gw) with ``(gh, gw) = grid_size((H, W))``; True = masked. Masked
                patch embeddings are replaced by ``mask_token`` before [CLS]/position embeddings.

        Returns:
            ``cls``: (B, D) final-normed [CLS] (Swin: mean of final tokens);
            ``patch``: (B, L, D) final-normed patch tokens, L = gh * gw (register tokens dropped).
        """
        cls, patch = self._split(self._tokens(x, mask))
        return {"cls": cls, "patch": patch}

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Final-normed tokens, (B, P+L, D): exactly timm's ``forward_features`` for ViT; for Swin the
        pooled token is prepended to the flattened grid so the layout matches (P = 1)."""
        tokens = self._tokens(x, mask)
        if self.kind == "swin":
            cls, patch = self._split(tokens)
            return torch.cat([cls.unsqueeze(1), patch], dim=1)
        return tokens

    def get_intermediate_layers(self, x: Tensor, n: int = 1, norm: bool = True) -> list[Tensor]:
        """Outputs of the last ``n`` blocks (Swin: of the last stage), oldest first.

        Args:
            x: images, (B, C, H, W).
            n: number of trailing blocks (linear probing uses the [CLS] of the last 4).
            norm: apply the final norm to every output, as DINO/iBOT evaluation does.

        Returns:
            list of ``n`` tensors (B, P+L, D), same token layout as ``forward_features``.
        """
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        m = self._timm
        if self.kind == "swin":
            last = m.layers[-1]
            blocks = list(last.blocks)
            h = last.downsample(m.layers[:-1](m.patch_embed(x)))
        else:
            blocks = list(m.blocks)
            h = self._vit_embed(x, None)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(blocks):
            raise ValueError(f"n must be an int in [1, {len(blocks)}], got {n!r}")
        outputs: list[Tensor] = []
        for i, block in enumerate(blocks):
            h = self._run_block(block, h)
            if i >= len(blocks) - n:
                outputs.append(m.norm(h) if norm else h)
        if self.kind == "swin":
            outputs = [
                torch.cat([o.flatten(1, 2).mean(1, keepdim=True), o.flatten(1, 2)], 1) for o in outputs
            ]
        return outputs

    def last_block_attention(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Softmax attention of the last block, computed explicitly (valid even when timm fuses SDPA).

        Args:
            x: images, (B, C, H, W).
            mask: optional bool token mask as in ``forward``.

        Returns:
            float32 attention probabilities, (B, heads, P+L, P+L); rows sum to 1.
        """
        if self.kind != "vit":
            raise NotImplementedError("last_block_attention is only defined for ViT (Swin uses windows)")
        m = self._timm
        h = self._vit_embed(x, mask)
        for block in m.blocks[:-1]:
            h = self._run_block(block, h)
        last = m.blocks[-1]
        attn = last.attn
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
            raise NotImplementedError(f"unsupported attention module {type(attn).__name__}")
        batch, tokens, _ = h.shape
        qkv = attn.qkv(last.norm1(h)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        # float32 logits: bf16 softmax over hundreds of tokens visibly distorts attention maps.
        with torch.autocast(device_type=q.device.type, enabled=False):
            logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
            return F.softmax(logits, dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory."""
        self.grad_checkpointing = enable
        self._timm.set_grad_checkpointing(enable)

    def compile_blocks(self) -> None:
        """Compile each transformer block in place (``nn.Module.compile``; names and weights unchanged).

        Not the whole model: the position embedding resampled for every crop size (bicubic, in the
        embedding) fails in a compiled backward ("Expected IntList but got GenericList", torch 2.14), and
        the blocks hold nearly all of the compute. Compiled blocks also compose with checkpointing and
        per-block sharding, which wrap the same modules.
        """
        m = self._timm
        blocks = [b for stage in m.layers for b in stage.blocks] if self.kind == "swin" else list(m.blocks)
        for block in blocks:
            block.compile()

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one: each ViT block, or each Swin stage (its blocks shift
        windows and merge patches between them, so a stage is the smallest unit with one input and one
        output)."""
        m = self._timm
        return list(m.layers) if self.kind == "swin" else list(m.blocks)

    def set_fused_attention(self, enable: bool) -> None:
        """Choose timm's fused SDPA kernel or explicit softmax(QK^T)V attention.

        On CPUs the explicit form trains faster for the short token sequences of small images (measured:
        about 2x for the Fashion-MNIST demo step in bf16), so the trainer turns fusion off there.
        """
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):
                setattr(module, "fused_attn", enable)  # noqa: B010 (typed as Module | Tensor)

    def no_weight_decay_keys(self) -> set[str]:
        """Parameter names (relative to this module) conventionally excluded from weight decay."""
        keys = {"mask_token"}
        timm_keys = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        # timm lists leaf names (Swin: "relative_position_bias_table"), so match them as suffixes.
        names = [name for name, _ in self.model.named_parameters()]
        matched = {n for n in names if any(n == k or n.endswith(f".{k}") for k in timm_keys)}
        return keys | {f"model.{n}" for n in matched}
