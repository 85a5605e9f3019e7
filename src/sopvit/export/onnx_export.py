"""ONNX export of a backbone's feature forward, verified against PyTorch with onnxruntime."""

from __future__ import annotations

import importlib.util
import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sopvit.models import Backbone

ONNX_TOLERANCE = 1e-4
OPSET = 17


class _Features(nn.Module):
    """Tuple-returning view of :meth:`Backbone.forward`: ONNX graphs have positional outputs, not dicts."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.backbone(images)
        return out["cls"], out["patch"]


def export_onnx(
    backbone: Backbone, out: Path, in_chans: int, image_size: int, verify: bool = True
) -> dict[str, float]:
    """Write ``backbone`` to ``out`` as ONNX: input ``images`` (B, C, H, W), outputs ``cls`` (B, D) and
    ``patch`` (B, L, D); the batch dimension is dynamic, H and W are fixed to ``image_size``.

    Returns:
        ``{"batch_1": diff, "batch_3": diff}``, the max abs difference to PyTorch for those batch sizes
        (empty when ``verify`` is False or onnxruntime is not installed).

    Raises:
        RuntimeError: the exported graph disagrees with PyTorch by more than ``ONNX_TOLERANCE``.
    """
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("ONNX export needs the 'onnx' package: pip install onnx onnxruntime")
    was_fused = _fused(backbone)
    # The explicit softmax(QK^T)V path exports to plain MatMul/Softmax ops that every runtime supports.
    backbone.set_fused_attention(False)
    wrapper = _Features(backbone).eval()
    # Batch 2 for tracing so that no dimension of size 1 gets specialised into the graph.
    dummy = torch.randn(2, in_chans, image_size, image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Tracing prints and warns about Python-side shape arithmetic in timm; none of it affects batch.
        with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with redirect_stderr(io.StringIO()):
                torch.onnx.export(
                    wrapper,
                    (dummy,),
                    str(out),
                    input_names=["images"],
                    output_names=["cls", "patch"],
                    dynamic_axes={"images": {0: "batch"}, "cls": {0: "batch"}, "patch": {0: "batch"}},
                    opset_version=OPSET,
                    do_constant_folding=True,
                    dynamo=False,
                )
    finally:
        backbone.set_fused_attention(was_fused)
    if not verify or importlib.util.find_spec("onnxruntime") is None:
        return {}
    return verify_onnx(backbone, out, in_chans, image_size)


def _fused(backbone: Backbone) -> bool:
    flags = [bool(m.fused_attn) for m in backbone.model.modules() if hasattr(m, "fused_attn")]
    return any(flags)


def verify_onnx(
    backbone: Backbone, path: Path, in_chans: int, image_size: int, batches: tuple[int, ...] = (1, 3)
) -> dict[str, float]:
    """Run ``path`` in onnxruntime and PyTorch on random images; raise if they differ by > tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    diffs: dict[str, float] = {}
    for batch in batches:
        images = torch.randn(batch, in_chans, image_size, image_size, generator=generator)
        with torch.no_grad():
            ref = backbone.eval()(images)
        cls, patch = session.run(["cls", "patch"], {"images": images.numpy()})
        diff = max(
            float(np.abs(cls - ref["cls"].numpy()).max()), float(np.abs(patch - ref["patch"].numpy()).max())
        )
        if cls.shape != tuple(ref["cls"].shape) or patch.shape != tuple(ref["patch"].shape):
            raise RuntimeError(
                f"{path}: onnxruntime output shapes {cls.shape}, {patch.shape} differ from PyTorch "
                f"{tuple(ref['cls'].shape)}, {tuple(ref['patch'].shape)} at batch {batch}"
            )
        if not diff < ONNX_TOLERANCE:
            raise RuntimeError(
                f"{path}: onnxruntime differs from PyTorch by {diff:.2e} (> {ONNX_TOLERANCE}) at batch "
                f"{batch}; the export is wrong, do not use it"
            )
        diffs[f"batch_{batch}"] = diff
    return diffs
