"""Architecture table and backbone factory.

Every architecture is a (timm model name, timm keyword arguments) pair, so a saved backbone state dict can
always be re-loaded with plain ``timm.create_model(backbone.timm_name, **backbone.timm_kwargs)``, even for
our own small CPU-sized configurations.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any

import timm
from timm.models.swin_transformer import SwinTransformer

from sopvit.models.backbone import Backbone, BackboneKind


@dataclass(frozen=True)
class ArchSpec:
    """One entry of the architecture table.

    Attributes:
        kind: ``"vit"`` or ``"swin"``; decides how the backbone masks and pools tokens.
        timm_name: registered timm model the architecture is built from.
        timm_kwargs: overrides applied on top of the timm defaults of ``timm_name``.
        img_size: default (square) input resolution of global crops.
        description: one line shown by ``describe_archs``.
    """

    kind: BackboneKind
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    description: str = ""


ARCHS: dict[str, ArchSpec] = {
    "vit_tiny_patch16_224": ArchSpec("vit", "vit_tiny_patch16_224", description="ViT-Ti/16, D=192"),
    "vit_small_patch16_224": ArchSpec("vit", "vit_small_patch16_224", description="ViT-S/16, D=384"),
    "vit_base_patch16_224": ArchSpec("vit", "vit_base_patch16_224", description="ViT-B/16, D=768"),
    "vit_large_patch16_224": ArchSpec("vit", "vit_large_patch16_224", description="ViT-L/16, D=1024"),
    # Beyond the paper (no published SOP number): ViT-H/14, and ViT-g/14 in DINOv2's shape (D=1536, 40
    # blocks, 24 heads, SwiGLU MLP, layer scale), at 224 px rather than DINOv2's 518. Sharded training
    # (train.parallel=fsdp) makes them fit: docs/scale.md.
    "vit_huge_patch14_224": ArchSpec("vit", "vit_huge_patch14_224", description="ViT-H/14, D=1280"),
    "vit_giant_patch14_224": ArchSpec(
        "vit", "vit_giant_patch14_dinov2", description="ViT-g/14 (DINOv2's giant), D=1536"
    ),
    # timm registers no tiny/large patch-8 models; the patch-16 entries with patch_size=8 are the same nets.
    "vit_tiny_patch8_224": ArchSpec(
        "vit", "vit_tiny_patch16_224", {"patch_size": 8}, description="ViT-Ti/8, D=192"
    ),
    "vit_small_patch8_224": ArchSpec("vit", "vit_small_patch8_224", description="ViT-S/8, D=384"),
    "vit_base_patch8_224": ArchSpec("vit", "vit_base_patch8_224", description="ViT-B/8, D=768"),
    "vit_large_patch8_224": ArchSpec(
        "vit", "vit_large_patch16_224", {"patch_size": 8}, description="ViT-L/8, D=1024"
    ),
    "swin_tiny_patch4_window7_224": ArchSpec(
        "swin", "swin_tiny_patch4_window7_224", description="Swin-T, window 7, D=768"
    ),
    "swin_tiny_patch4_window14_224": ArchSpec(
        "swin", "swin_tiny_patch4_window7_224", {"window_size": 14}, description="Swin-T, window 14, D=768"
    ),
    # CPU-sized demo: 28 px globals give a 7x7 grid; dynamic padding lets 14 px locals give a 4x4 grid
    # (pad 14 -> 16) instead of failing the divisibility check.
    "vit_demo": ArchSpec(
        "vit",
        "vit_tiny_patch16_224",
        {"patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "dynamic_img_pad": True},
        img_size=28,
        description="demo ViT, patch 4, D=192, depth 6, 3 heads, 28 px",
    ),
    "vit_test": ArchSpec(
        "vit",
        "vit_tiny_patch16_224",
        {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
        img_size=32,
        description="unit-test ViT, patch 4, D=32, depth 2, 2 heads, 32 px",
    ),
}

_INT_OVERRIDES = (
    "patch_size",
    "img_size",
    "in_chans",
    "embed_dim",
    "depth",
    "depths",
    "num_heads",
    "window_size",
)


def available_archs() -> list[str]:
    """Names accepted by :func:`create_backbone`, sorted."""
    return sorted(ARCHS)


def describe_archs() -> str:
    """Human-readable table of the registered architectures (one per line)."""
    width = max(len(name) for name in ARCHS)
    return "\n".join(f"{name:<{width}}  {ARCHS[name].description}" for name in available_archs())


def get_arch_spec(arch: str) -> ArchSpec:
    """Look up ``arch`` in the table; unknown names raise ValueError suggesting the closest match."""
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str, got {type(arch).__name__}")
    spec = ARCHS.get(arch)
    if spec is None:
        close = difflib.get_close_matches(arch, ARCHS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown arch {arch!r}.{hint} Valid names: {', '.join(available_archs())}")
    return spec


def _check_positive_ints(name: str, value: Any) -> None:
    # Swin takes per-stage tuples (num_heads, window_size, ...), ViT plain ints.
    items = value if isinstance(value, (tuple, list)) and value else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in items):
        raise ValueError(f"{name} must be a positive int (or tuple of them), got {value!r}")


def _swin_accepts(kwarg: str) -> bool:
    # Older timm (<1.0.10-ish) has no dynamic-size Swin; probing the signature keeps us importable there.
    return kwarg in inspect.signature(SwinTransformer.__init__).parameters


def resolve_timm_kwargs(
    arch: str,
    img_size: int | None = None,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> tuple[str, dict[str, Any]]:
    """Compute the ``(timm_name, kwargs)`` pair :func:`create_backbone` passes to ``timm.create_model``.

    Args:
        arch: name from :data:`ARCHS`.
        img_size: nominal square input size (sets the stored position-embedding grid); ``None`` uses the
            arch default.
        in_chans: input channels.
        drop_path_rate: stochastic depth rate (does not change parameter names or shapes).
        **overrides: extra timm constructor arguments (e.g. ``patch_size``, ``embed_dim``, ``depth``,
            ``num_heads``, ``reg_tokens``, ``window_size``); they win over the table entry.
    """
    spec = get_arch_spec(arch)
    if img_size is None:
        img_size = int(overrides.pop("img_size", spec.img_size))
    elif "img_size" in overrides:
        raise TypeError("img_size given both positionally and as an override")
    if not isinstance(drop_path_rate, (int, float)) or not 0.0 <= float(drop_path_rate) < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    kwargs: dict[str, Any] = {**spec.timm_kwargs, **overrides}
    kwargs.update(img_size=img_size, in_chans=in_chans, drop_path_rate=float(drop_path_rate))
    for name in _INT_OVERRIDES:
        if name in kwargs:
            _check_positive_ints(name, kwargs[name])
    if kwargs.get("pretrained"):
        raise ValueError("pretrained=True is not supported: SOP pre-trains from scratch and never downloads")
    if kwargs.get("class_token") is False:
        raise ValueError("class_token=False is not supported: SOP reads the [CLS] token of ViTs")
    kwargs["num_classes"] = 0
    kwargs["pretrained"] = False
    if spec.kind == "vit":
        # NHWC patch embeddings + on-the-fly pos-embed resampling: globals and locals share one model.
        kwargs["dynamic_img_size"] = True
    else:
        if "depth" in kwargs:
            raise ValueError("Swin takes per-stage 'depths'/'num_heads' tuples, not 'depth'")
        if _swin_accepts("strict_img_size"):
            kwargs["strict_img_size"] = False
    return spec.timm_name, kwargs


def create_backbone(
    arch: str,
    img_size: int | None = None,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> Backbone:
    """Build a randomly initialised :class:`Backbone` (never downloads weights).

    Args:
        arch: name from :data:`ARCHS` (see :func:`describe_archs`).
        img_size: nominal square input size; ``None`` uses the arch default (224, or 28/32 for the
            demo/test nets). ViTs accept any size at run time (position embeddings are resampled).
        in_chans: input channels.
        drop_path_rate: stochastic depth rate.
        **overrides: timm constructor overrides (``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
            ``reg_tokens``, ``window_size`` ...).

    Returns:
        Backbone whose ``model`` is the timm network and whose ``timm_name``/``timm_kwargs`` rebuild it.
    """
    spec = get_arch_spec(arch)
    timm_name, kwargs = resolve_timm_kwargs(arch, img_size, in_chans, drop_path_rate, **overrides)
    model = timm.create_model(timm_name, **kwargs)
    return Backbone(model, kind=spec.kind, arch=arch, timm_name=timm_name, timm_kwargs=kwargs)
