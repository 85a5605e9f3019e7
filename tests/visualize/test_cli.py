"""`sopvit visualize` and `sopvit report` from the command line."""

from pathlib import Path

import pytest
from PIL import Image

from sopvit.cli import main


def test_visualize_and_report_commands(trained_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "shirt.png"
    Image.new("L", (28, 28), 128).save(image)
    attention = tmp_path / "attention.png"
    args = [
        "visualize",
        "attention",
        "--checkpoint",
        str(trained_run),
        "--image",
        str(image),
        "--out",
        str(attention),
    ]
    assert main(args) == 0 and attention.stat().st_size > 0
    gallery = tmp_path / "gallery.png"
    assert main(["visualize", "prototypes", "--checkpoint", str(trained_run), "--out", str(gallery)]) == 0
    assert gallery.stat().st_size > 0
    html = tmp_path / "report.html"
    assert main(["report", str(trained_run), "--out", str(html)]) == 0
    assert "<html" in html.read_text().lower()


def test_attention_without_an_image_is_a_one_line_error(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["visualize", "attention", "--checkpoint", str(trained_run)]) == 2
    assert "--image" in capsys.readouterr().err
