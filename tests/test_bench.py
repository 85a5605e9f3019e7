"""`sopvit bench` runs on a CPU in a CI-sized setting and prints a well-formed table and JSON."""

import json

import pytest

from sopvit.cli import main
from tests.train.tiny import TINY


def test_bench_smoke(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    args = ["bench", "--steps", "2", "--warmup", "1", "--input-batches", "2", "--json", str(out), *TINY]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for row in (
        "step with SOP",
        "step, trivial loss",
        "SOP overhead",
        "SOP objective alone",
        "model GFLOPs/step",
        "input pipeline",
    ):
        assert row in printed
    result = json.loads(out.read_text())
    assert result["method_ms_per_step"] > 0 and result["base_ms_per_step"] > 0
    assert result["model_gflops_per_step"] > 0
    assert 0 < result["objective_share"] < 1
    assert result["input_images_per_s"] > 0
    assert json.loads(printed.strip().splitlines()[-1]) == result


def test_bench_synthesises_jpegs_for_folder_recipes(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    args = [
        "bench",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--input-batches",
        "1",
        *TINY,
        "data.dataset=folder",
        "data.in_chans=3",
        "data.batched_augment=false",
        "data.num_workers=0",
    ]
    assert main(args) == 0
    assert "input pipeline" in capsys.readouterr().out
