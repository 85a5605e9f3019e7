"""`sopvit eval NAME --checkpoint RUN overrides...` prints a table and one JSON line."""

import json
from pathlib import Path

import pytest
import torch

from sopvit.cli import main
from sopvit.eval.knn import KNNConfig
from sopvit.eval.knn import run as run_knn
from sopvit.models import create_backbone
from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config


def test_eval_knn_and_logreg_on_a_trained_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Trainer(tiny_config(tmp_path / "run", "train.max_steps=1")).fit()
    common = [
        "--checkpoint",
        str(tmp_path / "run"),
        "image_size=16",
        "limit=300",
        f"cache_dir={tmp_path / 'c'}",
    ]
    assert main(["eval", "knn", *common, "ks=[20]"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval"] == "knn" and 0 <= result["knn_top1@20"] <= 100
    assert main(["eval", "logreg", *common, "--json", str(tmp_path / "logreg.json")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"wrote {tmp_path / 'logreg.json'}"
    printed = json.loads(out[-2])
    assert 0 <= printed["logreg_top1"] <= 100
    saved = json.loads((tmp_path / "logreg.json").read_text())
    assert saved["logreg_top1"] == printed["logreg_top1"] and saved["config"]["limit"] == 300


def test_unknown_protocol_and_bad_override_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "nope", "--checkpoint", str(tmp_path)]) == 2
    assert (
        "available: copydays, davis, finetune, knn, linear, logreg, retrieval, robustness"
        in capsys.readouterr().err
    )
    assert main(["eval", "knn", "--checkpoint", str(tmp_path), "kss=[20]"]) == 2
    assert "did you mean 'ks'" in capsys.readouterr().err


def test_eval_a_bare_timm_state_dict_with_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=16, in_chans=1)
    # as reference code saves it: wrapped, prefixed, with the projection head next to the backbone
    weights = {f"module.backbone.{k}": v for k, v in backbone.model.state_dict().items()}
    torch.save(
        {"teacher": {**weights, "module.head.last_layer.weight": torch.zeros(3, 3)}}, tmp_path / "t.pth"
    )
    args = ["--checkpoint", str(tmp_path / "t.pth"), "image_size=16", "limit=200", "ks=[10]"]
    assert main(["eval", "knn", *args, "--arch", "vit_test"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = run_knn(backbone, KNNConfig(image_size=16, limit=200, ks=(10,), device="cpu"))
    assert result["knn_top1@10"] == expected["knn_top1@10"]
    # without --arch the file is not one of ours: the error says what it accepts, in one line
    assert main(["eval", "knn", *args]) == 2
    assert "sopvit: error:" in capsys.readouterr().err
