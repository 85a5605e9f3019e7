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
        "input (augment_on=workers)",
    ):
        assert row in printed
    result = json.loads(out.read_text())
    assert result["method_ms_per_step"] > 0 and result["base_ms_per_step"] > 0
    assert result["model_gflops_per_step"] > 0
    assert result["objective_share"] > 0  # a ratio of two timings: under load it may pass 1
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
        "data.augment_on=workers",
        "data.num_workers=0",
    ]
    assert main(args) == 0
    assert "input (augment_on=workers)" in capsys.readouterr().out


def test_bench_reports_the_device_path_and_whether_the_step_would_wait_for_it() -> None:
    from sopvit.bench import format_table

    row = {
        "device": "cpu",
        "torch": "2",
        "method": "sop",
        "arch": "vit_test",
        "batch": 8,
        "crops": "2x16 + 2x8",
        "precision": "fp32",
        "compile": False,
        "method_ms_per_step": 10.0,
        "method_images_per_s": 800.0,
        "base_ms_per_step": 9.0,
        "base_images_per_s": 880.0,
        "method_overhead": 0.1,
        "objective_ms": 1.0,
        "objective_share": 0.1,
        "model_gflops_per_step": 1.0,
        "mfu": None,
        "peak_memory_gib": None,
        "host_peak_rss_gib": 1.0,
        "input_path": "device",
        "input_images_per_s": 500.0,
        "input_cpu_ms_per_image": 1.5,
    }
    table = format_table(row)
    assert "input (augment_on=device)  500 img/s, 1.50 CPU core-ms/img  input-bound" in table
    assert "input-bound" not in format_table({**row, "input_images_per_s": 900.0})


@pytest.mark.parametrize("method", ["ibot", "dino"])
def test_bench_times_the_baselines_too(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    """DINO sends no patch tokens through the head: the trivial-loss step must not average an empty tensor."""
    args = ["bench", "--steps", "1", "--warmup", "0", "--input-batches", "0", *TINY, f"method={method}"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == method and result["base_ms_per_step"] > 0 and result["method_ms_per_step"] > 0
