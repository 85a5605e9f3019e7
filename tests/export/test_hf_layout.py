"""What an ``hf`` folder holds, and every folder layout ``load_pretrained`` reads: ours (formats 1 and 2)
and timm's own ``save_for_hf`` folders; unreadable folders fail with one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import save_for_hf
from torch import Tensor

from sopvit.export import export, load_pretrained
from sopvit.models import Backbone
from tests.train.tiny import tiny_run, tiny_teacher

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FORMAT1 = FIXTURES / "hf_export_v1"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory, "hf_layout")


@pytest.fixture(scope="module")
def teacher(run_dir: Path) -> Backbone:
    return tiny_teacher(run_dir)


def features(model: torch.nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out: Tensor = model.eval().forward_features(x)  # type: ignore[operator]
    return out


def test_hf_folder_is_in_timm_hub_layout(run_dir: Path, teacher: Backbone, tmp_path: Path) -> None:
    folder = export(run_dir, "hf", tmp_path / "hf", include_head=True)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "sopvit.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and timm.is_model(config["architecture"])
    assert config["num_classes"] == 0 and config["num_features"] == 32
    args = config["model_args"]
    assert "num_classes" not in args  # transformers passes its own num_classes=0
    assert {k: args[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "img_size")} == {
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "img_size": 16,
    }
    assert args["in_chans"] == 1 and args["dynamic_img_size"] and args["class_token"]
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [1, 16, 16] and len(pre["mean"]) == len(pre["std"]) == 1
    assert pre["num_classes"] == 0 and pre["interpolation"] == "bicubic" and pre["crop_pct"] == 0.875
    meta = config["sopvit"]
    assert meta["format_version"] == 2 and meta["arch"] == "vit_test" and meta["method"] == "sop"
    assert meta["step"] == 1 and meta["recipe"]["model"]["arch"] == "vit_test"
    assert meta["source_run"] == str(run_dir) and meta["embed_dim"] == 32
    # timm's keys exactly, so timm's strict loading takes them; the rest rides in sopvit.safetensors.
    assert sorted(load_file(str(folder / "model.safetensors"))) == sorted(teacher.model.state_dict())
    extras = load_file(str(folder / "sopvit.safetensors"))
    assert "mask_token" in extras and any(k.startswith("head.") for k in extras)
    card = (folder / "README.md").read_text()
    assert "local-dir:" in card and "AutoModel.from_pretrained" in card and "load_pretrained" in card


def test_sopvit_reads_its_folder_with_the_mask_token(
    run_dir: Path, teacher: Backbone, tmp_path: Path
) -> None:
    folder = export(run_dir, "safetensors", tmp_path / "st")
    assert not (folder / "README.md").exists()
    assert not any(k.startswith("head.") for k in load_file(str(folder / "sopvit.safetensors")))
    x = torch.randn(3, 1, 16, 16)
    for source in (folder, folder / "model.safetensors"):
        loaded = load_pretrained(source)
        assert loaded.arch == "vit_test" and loaded.timm_kwargs == teacher.timm_kwargs
        assert (features(loaded, x) - features(teacher, x)).abs().max().item() < 1e-5
        assert torch.equal(loaded.mask_token, teacher.mask_token)
        assert all(p.requires_grad for p in loaded.parameters())


def test_format1_folders_still_load() -> None:
    """A folder written by the exporter before the timm layout (config.json of format 1, head inside).

    tests/fixtures/hf_export_v1 is ``export(run, "hf", out, include_head=True)`` of the tiny run at commit
    283cec1; ``expected_features.safetensors`` beside it holds that run teacher's ``forward_features``.
    """
    assert json.loads((FORMAT1 / "config.json").read_text())["format_version"] == 1
    expected = load_file(str(FORMAT1 / "expected_features.safetensors"))
    loaded = load_pretrained(FORMAT1)
    assert loaded.arch == "vit_test" and loaded.kind == "vit"
    torch.testing.assert_close(features(loaded, expected["images"]), expected["features"], rtol=0, atol=1e-6)


def timm_folder(tmp_path: Path, name: str, safe: bool, **kwargs: Any) -> tuple[Path, torch.nn.Module]:
    model = timm.create_model(name, **kwargs).eval()
    save_for_hf(model, str(tmp_path / name), safe_serialization=safe)
    return tmp_path / name, model


@pytest.mark.parametrize(
    ("name", "safe", "kwargs", "size"),
    [
        ("vit_tiny_patch16_224", True, {"img_size": 32, "num_classes": 0}, 32),
        # A classifier in a pickled pytorch_model.bin: the backbone is read without its head.
        ("vit_tiny_patch16_224", False, {"img_size": 32, "num_classes": 5, "reg_tokens": 2}, 32),
        ("swin_tiny_patch4_window7_224", True, {"img_size": 64, "num_classes": 0}, 64),
    ],
)
def test_sopvit_reads_folders_timm_wrote(
    tmp_path: Path, name: str, safe: bool, kwargs: dict[str, Any], size: int
) -> None:
    folder, model = timm_folder(tmp_path, name, safe, **kwargs)
    loaded = load_pretrained(folder)
    x = torch.randn(2, 3, size, size)
    expected = features(model, x)
    got = features(loaded, x)
    if loaded.kind == "swin":
        got = got[:, 1:].unflatten(1, expected.shape[1:3])
    assert (got - expected).abs().max().item() < 1e-5
    assert loaded.timm_name == name and loaded.timm_kwargs["num_classes"] == 0


def expect_one_line(match: str, folder: Path) -> None:
    with pytest.raises(ValueError, match=match) as err:
        load_pretrained(folder)
    assert "\n" not in str(err.value)


def test_unreadable_folders_are_one_line_errors(run_dir: Path, tmp_path: Path) -> None:
    folder = export(run_dir, "safetensors", tmp_path / "ours")
    config = json.loads((folder / "config.json").read_text())

    def variant(name: str, data: dict[str, object], weights_from: Path = folder) -> Path:
        out = tmp_path / name
        shutil.copytree(weights_from, out)
        (out / "config.json").write_text(json.dumps(data))
        return out

    expect_one_line("neither a sopvit export nor a timm Hub config", variant("plain", {"hidden_size": 3}))
    unknown = {**config, "architecture": "no_such_net"}
    unknown.pop("sopvit")
    expect_one_line("names architecture 'no_such_net', which timm .* does not know", variant("u", unknown))
    resnet, _ = timm_folder(tmp_path, "resnet18", True, num_classes=0)
    expect_one_line("holds a timm resnet18; sopvit backbones are timm ViTs and Swins", resnet)
    wider = {**config, "sopvit": {**config["sopvit"], "timm_kwargs": {**config["sopvit"]["timm_kwargs"]}}}
    wider["sopvit"]["timm_kwargs"]["embed_dim"] = 64
    expect_one_line(
        r"does not fit timm vit_tiny_patch16_224 .*shapes that differ: cls_token", variant("w", wider)
    )
    no_kind = {**config, "sopvit": {k: v for k, v in config["sopvit"].items() if k != "kind"}}
    expect_one_line("has no 'kind' entry", variant("k", no_kind))
