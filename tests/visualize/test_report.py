from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sopvit.visualize import write_report

CHROMIUM = Path("/usr/bin/chromium")


def _add_knn_and_demo(run_dir: Path) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 2, "knn_top1": 41.5}) + "\n")
        f.write(json.dumps({"step": 4, "knn_top1": 47.25}) + "\n")
        f.write('{"step": 5, "loss": 1.0')  # a line cut short by a kill
    (run_dir / "demo_results.json").write_text(
        json.dumps({"knn_raw_pixels": 85.5, "knn_trained": 88.125, "minutes": 3.0})
    )


def test_report_is_self_contained_with_all_sections(run_copy: Path) -> None:
    _add_knn_and_demo(run_copy)
    out = write_report(run_copy)
    assert out == run_copy / "report.html"
    text = out.read_text(encoding="utf-8")
    for anchor in ("losses", "schedules", "assignments", "knn", "throughput", "prototypes", "demo", "config"):
        assert f'id="{anchor}"' in text
    assert 'src="http' not in text and "<script" not in text and "<link" not in text
    # Losses, schedules, assignments, k-NN, throughput and the prototype gallery are inline PNGs.
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 6
    assert "prototype gallery skipped" not in text
    assert "88.12" in text and "knn_raw_pixels" in text
    assert "arch: vit_test" in text and "cls_bank_size: 64" in text


def test_report_notes_what_is_missing(run_copy: Path, tmp_path: Path) -> None:
    (run_copy / "checkpoint.pt").unlink()
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "config.yaml").write_text("note: <b>&</b>\n")
    out = write_report(run_copy, tmp_path / "elsewhere" / "r.html")
    text = out.read_text(encoding="utf-8")
    assert "prototype gallery skipped" in text and "checkpoint.pt" in text
    assert "no knn_top1 values logged" in text
    assert 'id="demo"' not in text
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in text and "<b>&</b>" not in text


def test_report_needs_a_run_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        write_report(tmp_path / "no-such-run")


def test_report_renders_in_headless_chromium(run_copy: Path, tmp_path: Path) -> None:
    assert CHROMIUM.is_file(), (
        f"{CHROMIUM} not found: the render check needs the Debian package `chromium` "
        "(apt-get install -y chromium)"
    )
    _add_knn_and_demo(run_copy)
    report = write_report(run_copy)
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        report.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert pixels.var() > 100, "the screenshot is blank"
