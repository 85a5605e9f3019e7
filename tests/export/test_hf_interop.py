"""An ``hf`` export loads in plain timm (no sopvit imported) and in transformers, with sopvit's features.

Every architecture family sopvit trains is covered: the tiny run's own export (1-channel vit_test), and
folders written from backbones of vit_demo (dynamic padding), a 32 px ViT-S/16 and a 64 px Swin-T.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from sopvit.export import export, load_pretrained
from sopvit.export.hf import hub_config, write_folder
from sopvit.models import Backbone, create_backbone
from tests.train.tiny import tiny_run

# arch -> (create_backbone arguments, input size)
ARCHS: dict[str, tuple[dict[str, int], int]] = {
    "vit_demo": ({"in_chans": 1}, 28),
    "vit_small_patch16_224": ({"img_size": 32}, 32),
    "swin_tiny_patch4_window7_224": ({"img_size": 64}, 64),
}
TOL = 1e-5

# Runs in a fresh interpreter: only torch and timm are imported, and sopvit must stay out of sys.modules.
TIMM_ONLY = """
import sys, timm, torch
cases = torch.load(sys.argv[1], weights_only=True)
out = {}
with torch.no_grad():
    for name, (folder, x) in cases.items():
        model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
        assert model.num_classes == 0, model.num_classes
        out[name] = model.forward_features(x)
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "sopvit")
assert not leaked, leaked
torch.save(out, sys.argv[2])
"""


def write_backbone(backbone: Backbone, out: Path, image_size: int) -> Path:
    """An ``hf`` folder of ``backbone`` as ``export`` writes it, less the run's provenance."""
    chans = int(backbone.timm_kwargs["in_chans"])
    meta = {
        "arch": backbone.arch,
        "kind": backbone.kind,
        "timm_name": backbone.timm_name,
        "timm_kwargs": backbone.timm_kwargs,
    }
    config = hub_config(backbone, image_size, [0.5] * chans, [0.25] * chans, meta)
    return write_folder(backbone, config, out, {}, None)


Cases = dict[str, tuple[Path, Tensor, Tensor]]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Cases:
    """name -> (exported folder, input images, ``load_pretrained(folder).forward_features(images)``)."""
    root = tmp_path_factory.mktemp("hf_interop")
    torch.manual_seed(0)
    folders = {"vit_test_run": (export(tiny_run(tmp_path_factory, "hf_run"), "hf", root / "run"), 16)}
    for arch, (kwargs, size) in ARCHS.items():
        folders[arch] = (write_backbone(create_backbone(arch, **kwargs), root / arch, size), size)
    gen = torch.Generator().manual_seed(1)
    out: Cases = {}
    for name, (folder, size) in folders.items():
        backbone = load_pretrained(folder).eval()
        x = torch.randn(2, backbone.timm_kwargs["in_chans"], size, size, generator=gen)
        with torch.no_grad():
            out[name] = (folder, x, backbone.forward_features(x))
    return out


def assert_same(name: str, tokens: Tensor, expected: Tensor) -> None:
    """timm's tokens against sopvit's ``forward_features``: the [CLS] token and all the others."""
    if name.startswith("swin"):
        # timm's Swin gives the (B, H, W, D) grid; sopvit prepends its mean as the pooled token.
        tokens = tokens.flatten(1, 2)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1)
    assert tokens.shape == expected.shape, (name, tokens.shape, expected.shape)
    cls_diff = (tokens[:, 0] - expected[:, 0]).abs().max().item()
    assert cls_diff < TOL, (name, cls_diff)
    assert (tokens - expected).abs().max().item() < TOL, name


@pytest.mark.slow
def test_timm_loads_every_arch_without_sopvit(cases: Cases, tmp_path: Path) -> None:
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save({name: (str(folder), x) for name, (folder, x, _) in cases.items()}, inputs)
    done = subprocess.run(
        [sys.executable, "-c", TIMM_ONLY, str(inputs), str(outputs)],
        cwd=tmp_path,  # not the repository root: nothing of sopvit is importable from the working dir
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    features = torch.load(outputs, weights_only=True)
    assert sorted(features) == sorted(cases)
    for name, (_, _, expected) in cases.items():
        assert_same(name, features[name], expected)


@pytest.fixture(scope="module")
def transformers() -> Any:
    # A fixture, listed before ``cases``, so a missing transformers skips before any folder is written.
    return pytest.importorskip(
        "transformers",
        minversion="4.47",
        reason="transformers >= 4.47 (TimmWrapperModel) is not installed: pip install transformers",
    )


def test_transformers_auto_model_loads_every_arch(transformers: Any, cases: Cases) -> None:
    for name, (folder, x, expected) in cases.items():
        model = transformers.AutoModel.from_pretrained(str(folder)).eval()
        assert type(model).__name__ == "TimmWrapperModel"
        with torch.no_grad():
            out = model(x, do_pooling=False).last_hidden_state
            pooled = model(x).pooler_output
        assert_same(name, out, expected)
        # The pooled feature is the [CLS] token for ViTs, the grid mean for Swin: sopvit's cls either way.
        assert (pooled - expected[:, 0]).abs().max().item() < TOL, name
