"""The pages as a browser shows them: headless Chromium loads every thumbnail (shard images included),
draws the placeholders, and the screenshot shows the images' colours."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sopvit.explore.dedup import dedup
from sopvit.explore.page import GalleryRow, Tile, write_gallery_page
from sopvit.explore.search import search, unit_rows
from tests.explore.test_page import sample_images
from tests.explore.test_search import color_images, write_table

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"{CHROMIUM} not found: the render check needs the Debian package `chromium` "
    "(apt-get install -y chromium)",
)

# Appended to a copy of the page (the page itself has no scripts): after load, counts the images the
# browser decoded and writes the counts where --dump-dom shows them.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    images: images.length,
    loaded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    placeholders: document.querySelectorAll(".missing").length,
  });
  document.body.appendChild(out);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


def render(page: Path, tmp: Path) -> tuple[dict[str, int], np.ndarray]:
    """The probe's counts for ``page`` and its screenshot (RGB pixels, 1000 x 1400)."""
    probe = tmp / f"probe-{page.parent.name}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp, "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
    assert found, f"the probe did not run (rc {dom.returncode}): {dom.stderr[-2000:]}"
    shot = tmp / f"shot-{page.parent.name}.png"
    done = _chromium(tmp, f"--screenshot={shot}", "--window-size=1000,1400", page.resolve().as_uri())
    assert shot.is_file(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    assert shot.stat().st_size > 10_000, "the screenshot is nearly empty"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1400, 1000, 3)
    return json.loads(found[1]), pixels


def shows(pixels: np.ndarray, color: tuple[int, int, int], at_least: int = 400) -> bool:
    """Whether the screenshot has a thumbnail's worth of pixels of ``color`` (JPEG: within 12)."""
    near = np.abs(pixels.astype(np.int16) - np.array(color, np.int16)).max(axis=2) <= 12
    return int(near.sum()) >= at_least


def test_gallery_page_loads_every_image_in_chromium(tmp_path: Path) -> None:
    images = sample_images(tmp_path / "data")
    readable = ["big", "grey", "shard0", "shard1"]
    rows = [
        GalleryRow("readable", [Tile(images[r], r) for r in readable]),
        GalleryRow("unreadable", [Tile(images[r], r) for r in ("corrupt", "missing", "nokey")]),
    ]
    page = write_gallery_page(tmp_path / "gallery" / "index.html", "gallery", "intro", rows)
    counts, pixels = render(page, tmp_path)
    assert counts == {"images": 4, "loaded": 4, "placeholders": 3}
    assert shows(pixels, (200, 40, 40))  # big.jpg
    assert shows(pixels, (10, 160, 10)) and shows(pixels, (230, 200, 20))  # the two images in the shard
    assert pixels.astype(np.float64).var() > 100


def test_search_and_dedup_pages_load_every_image_in_chromium(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = color_images(tmp_path / "images", 20)
    vectors = unit_rows(rng.standard_normal((20, 16)))
    vectors[5] = vectors[2]  # one pair of duplicates for dedup to show
    table = write_table(tmp_path / "e.parquet", vectors, paths)
    queries = write_table(tmp_path / "q.parquet", vectors[[0, 9]], [paths[0], paths[9]])
    search(table, queries, 5, tmp_path / "search")
    counts, pixels = render(tmp_path / "search" / "index.html", tmp_path)
    assert counts == {"images": 2 * (1 + 5), "loaded": 12, "placeholders": 0}
    assert shows(pixels, (37 * 9 % 256, 91 * 9 % 256, 53 * 9 % 256))  # query 9's own image, its first hit
    dedup(table, 0.99, tmp_path / "dedup")
    counts, pixels = render(tmp_path / "dedup" / "index.html", tmp_path)
    assert counts == {"images": 2, "loaded": 2, "placeholders": 0}
    assert all(shows(pixels, (37 * i % 256, 91 * i % 256, 53 * i % 256)) for i in (2, 5))  # both drawn
