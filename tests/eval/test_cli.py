"""`sopvit eval NAME --checkpoint RUN overrides...` prints a table and one JSON line."""

import json
from pathlib import Path

import pytest

from sopvit.cli import main
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
