"""`sopvit export` from the command line, and its errors."""

from pathlib import Path

import pytest
import torch

from sopvit.cli import main
from sopvit.export import load_pretrained
from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config


def test_export_command_writes_a_loadable_folder(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", "train.max_steps=1"))
    trainer.fit()
    assert (
        main(
            ["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]
        )
        == 0
    )
    backbone = load_pretrained(tmp_path / "hf")
    x = torch.randn(2, 1, 16, 16)
    expected = trainer.model.teacher.backbone.eval().forward_features(x)
    torch.testing.assert_close(backbone.forward_features(x), expected, atol=1e-5, rtol=1e-5)


def test_export_of_a_missing_run_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["export", "--checkpoint", str(tmp_path / "none"), "--format", "timm", "--out", str(tmp_path)])
        == 2
    )
    assert str(tmp_path / "none") in capsys.readouterr().err


def test_loaded_backbones_are_trainable(tmp_path: Path) -> None:
    Trainer(tiny_config(tmp_path / "run", "train.max_steps=1")).fit()
    backbone = load_pretrained(tmp_path / "run")  # the run's teacher was frozen while pre-training
    assert all(p.requires_grad for p in backbone.parameters())
