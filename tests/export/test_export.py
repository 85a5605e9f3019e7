"""Round trips of every export format on a tiny trained run, reference-checkpoint loading and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import Tensor

from sopvit.export import EXPORT_FORMATS, export, load_pretrained, load_reference_checkpoint
from sopvit.models import Backbone, create_backbone
from tests.train.tiny import tiny_run, tiny_teacher

REPO = Path(__file__).resolve().parents[2]
# Names of training-only state: none of them may appear in an exported file.
FORBIDDEN = ("optimizer", "objective", "bank", "memory", "student", "rng", "exp_avg")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory, "export")


@pytest.fixture(scope="module")
def teacher(run_dir: Path) -> Backbone:
    return tiny_teacher(run_dir)


def images(batch: int = 2, size: int = 16) -> Tensor:
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(1))


def features(model: torch.nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out: Tensor = model.forward_features(x)  # type: ignore[operator]
    return out


def check_clean(keys: list[str]) -> None:
    leaked = [k for k in keys if any(word in k for word in FORBIDDEN)]
    assert not leaked, leaked


def test_timm_round_trip(run_dir: Path, teacher: Backbone, tmp_path: Path) -> None:
    path = export(run_dir, "timm", tmp_path / "timm")
    args = json.loads((path.parent / "timm_args.json").read_text())
    model = timm.create_model(args["timm_name"], **args["timm_kwargs"]).eval()
    weights = torch.load(path, weights_only=True)
    check_clean(list(weights))
    model.load_state_dict(weights, strict=True)
    x = images()
    diff = (features(model, x) - features(teacher, x)).abs().max().item()
    assert diff < 1e-5, diff
    assert (features(load_pretrained(path), x) - features(teacher, x)).abs().max().item() < 1e-5


def test_timm_head_goes_to_separate_file(run_dir: Path, tmp_path: Path) -> None:
    path = export(run_dir, "timm", tmp_path / "b.pth", include_head=True)
    head = torch.load(tmp_path / "b_head.pth", weights_only=True)
    assert all(k.startswith("mlp.") for k in head)
    assert not any(k.startswith("head.") for k in torch.load(path, weights_only=True))


@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_folder_round_trip(run_dir: Path, teacher: Backbone, tmp_path: Path, fmt: str) -> None:
    folder = export(run_dir, fmt, tmp_path / fmt, include_head=fmt == "hf")
    assert (folder / "README.md").is_file() == (fmt == "hf")
    keys = list(load_file(str(folder / "model.safetensors")))
    extras = list(load_file(str(folder / "sopvit.safetensors")))  # mask token, head: beside timm's keys
    check_clean(keys + extras)
    assert not any(k.startswith("head.") for k in keys)
    assert any(k.startswith("head.") for k in extras) == (fmt == "hf")
    meta = json.loads((folder / "config.json").read_text())["sopvit"]
    assert meta["arch"] == "vit_test" and meta["in_chans"] == 1 and meta["image_size"] == 16
    assert meta["patch_size"] == 4 and meta["embed_dim"] == 32 and meta["step"] == 1
    assert len(meta["mean"]) == len(meta["std"]) == 1 and meta["recipe"]["model"]["arch"] == "vit_test"
    loaded = load_pretrained(folder)
    assert not loaded.training
    x = images(3)
    assert (features(loaded, x) - features(teacher, x)).abs().max().item() < 1e-5
    from_file = load_pretrained(folder / "model.safetensors")
    assert torch.equal(features(from_file, x), features(loaded, x))


def test_load_pretrained_from_run(run_dir: Path, teacher: Backbone) -> None:
    x = images()
    for source in (run_dir, run_dir / "checkpoint.pt"):
        assert torch.equal(features(load_pretrained(source), x), features(teacher, x))


def test_onnx_round_trip_dynamic_batch(run_dir: Path, teacher: Backbone, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = export(run_dir, "onnx", tmp_path / "onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (1, 3):
        x = images(batch)
        cls, patch = session.run(["cls", "patch"], {"images": x.numpy()})
        with torch.no_grad():
            ref = teacher(x)
        assert cls.shape == (batch, 32) and patch.shape == (batch, 16, 32)
        assert abs(cls - ref["cls"].numpy()).max() < 1e-4
        assert abs(patch - ref["patch"].numpy()).max() < 1e-4


def reference_dict(backbone: Backbone) -> dict[str, object]:
    """A checkpoint laid out like the iBOT/SOP reference code: DDP prefixes, head, masked_embed, args."""
    teacher = {f"module.backbone.{k}": v.clone() for k, v in backbone.model.state_dict().items()}
    teacher["module.backbone.masked_embed"] = torch.full((1, backbone.embed_dim), 0.5)
    teacher["module.head.mlp.0.weight"] = torch.zeros(8, backbone.embed_dim)
    student = {f"teacher.backbone.{k}": torch.zeros_like(v) for k, v in backbone.model.state_dict().items()}
    return {"student": student, "teacher": teacher, "epoch": 3, "args": {"arch": "vit_small"}}


def test_reference_checkpoint(teacher: Backbone, tmp_path: Path) -> None:
    path = tmp_path / "ref.pth"
    torch.save(reference_dict(teacher), path)
    kwargs = {"img_size": 16, "in_chans": 1}
    loaded = load_reference_checkpoint(path, "vit_test", **kwargs)
    x = images()
    assert (features(loaded, x) - features(teacher, x)).abs().max().item() < 1e-6
    assert torch.all(loaded.mask_token == 0.5)
    wrapped = {"state_dict": {f"backbone.{k}": v for k, v in teacher.model.state_dict().items()}}
    assert torch.equal(
        features(load_reference_checkpoint(wrapped, "vit_test", **kwargs), x), features(teacher, x)
    )


def test_reference_checkpoint_mismatch_lists_keys(teacher: Backbone) -> None:
    weights = {f"module.encoder.layer{k}": v for k, v in teacher.model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"missing keys: .*blocks\.0\.attn\.qkv\.weight.*unexpected keys: layer"
    ):
        load_reference_checkpoint({"model": weights}, "vit_test", img_size=16, in_chans=1)
    with pytest.raises(ValueError, match="shapes"):
        load_reference_checkpoint(dict(teacher.model.state_dict()), "vit_test", embed_dim=64, in_chans=1)


def test_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        export(tmp_path / "nope", "timm", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="valid formats: timm, safetensors, hf, onnx"):
        export(run_dir, "keras", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"checkpoint\.pt"):
        export(tmp_path, "timm", tmp_path / "out")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a readable sopvit checkpoint"):
        export(foreign, "hf", tmp_path / "out")
    assert EXPORT_FORMATS == ("timm", "safetensors", "hf", "onnx")


def test_hub_entry_points(run_dir: Path, tmp_path: Path) -> None:
    model = torch.hub.load(str(REPO), "sop_vit_small", source="local", trust_repo=True)
    assert isinstance(model, Backbone) and model.embed_dim == 384 and not model.training
    small = torch.hub.load(str(REPO), "sop_vit_small", source="local", img_size=32)
    assert small.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 5, 384)
    folder = export(run_dir, "hf", tmp_path / "hf")
    # The tiny test net is not a ViT-S: the entry point loads it and refuses the mismatch.
    with pytest.raises(ValueError, match="width 32"):
        torch.hub.load(str(REPO), "sop_vit_small", source="local", weights=str(folder))
    assert create_backbone("vit_test").embed_dim == 32
