"""A run written by main at b643631 (before the package move; tiny SOP model, 3 steps, kept in
tests/fixtures/run_b643631) still resumes, exports, evaluates and visualises with today's code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sopvit.cli import main
from sopvit.export import export, load_pretrained
from sopvit.train.trainer import Trainer
from sopvit.visualize import prototype_gallery, save_attention_figure
from tests.train.tiny import tiny_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "run_b643631"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def test_it_resumes_on_the_losses_the_old_code_computed(old_run: Path) -> None:
    # the run was written with the tiny config and data.limit=64; the old code then resumed it to step 5
    trainer = Trainer(tiny_config(old_run, "train.max_steps=5", "data.limit=64"))
    assert trainer.step == 3
    trainer.fit()
    rows = {row["step"]: row for row in map(json.loads, (old_run / "metrics.jsonl").read_text().splitlines())}
    expected = json.loads((FIXTURE / "expected.json").read_text())["resumed_to_step_5"]
    for step, losses in expected.items():
        for key, value in losses.items():
            assert rows[int(step)][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)


def test_it_exports_and_loads_back(old_run: Path, tmp_path: Path) -> None:
    reference = load_pretrained(str(old_run)).eval()
    for fmt in ("safetensors", "timm"):
        out = export(old_run, fmt, tmp_path / fmt)  # type: ignore[arg-type]
        backbone = load_pretrained(str(out)).eval()
        x = torch.randn(2, 1, 16, 16)
        with torch.no_grad():
            assert torch.allclose(backbone.forward_features(x), reference.forward_features(x), atol=1e-6)


def test_it_evaluates(old_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--checkpoint", str(old_run), "image_size=16", "limit=200", f"cache_dir={tmp_path / 'c'}"]
    assert main(["eval", "knn", *args, "ks=[20]"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= result["knn_top1@20"] <= 100


def test_it_visualises(old_run: Path, tmp_path: Path) -> None:
    gallery = prototype_gallery(old_run, tmp_path / "gallery.png", n_prototypes=2, k=2)
    assert gallery.stat().st_size > 0
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("L", (16, 16), 128).save(image)
    figure = save_attention_figure(old_run, image, tmp_path / "attention.png")
    assert Path(figure).stat().st_size > 0
