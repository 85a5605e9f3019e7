"""The gallery page: one self-contained file of inline thumbnails (shard images too), a placeholder that
says why for each image it cannot show, escaped text, and an atomic write that keeps what it must not
replace."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from sopvit.data.shard_writer import write_shards
from sopvit.data.shards import ShardDataset
from sopvit.explore.page import GalleryRow, OutputExistsError, Tile, write_gallery_page

URI = re.compile(r'<img src="data:image/(jpeg|png);base64,([^"]+)"')


def sample_images(root: Path) -> dict[str, str]:
    """Readable images of several kinds (a big JPEG, a transparent PNG, a grey PNG, two in a tar shard)
    and three unreadable paths (corrupt bytes, a missing file, a key the shard lacks), by role."""
    folder = root / "folder" / "cls"
    folder.mkdir(parents=True)
    Image.new("RGB", (640, 400), (200, 40, 40)).save(folder / "big.jpg", quality=90)
    Image.new("RGBA", (64, 64), (0, 90, 200, 128)).save(folder / "alpha.png")
    Image.new("L", (32, 48), 128).save(folder / "grey.png")
    packed = root / "packed" / "cls"
    packed.mkdir(parents=True)
    for i, color in enumerate([(10, 160, 10), (230, 200, 20)]):
        Image.new("RGB", (40, 40), color).save(packed / f"s{i}.png")
    write_shards(root / "packed", root / "shards", per_shard=10)
    shard_paths = ShardDataset(str(root / "shards")).paths
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 this is no JPEG")
    shard = shard_paths[0].rpartition(":")[0]
    return {
        "big": str(folder / "big.jpg"),
        "alpha": str(folder / "alpha.png"),
        "grey": str(folder / "grey.png"),
        "shard0": shard_paths[0],
        "shard1": shard_paths[1],
        "corrupt": str(folder / "corrupt.jpg"),
        "missing": str(folder / "gone.png"),
        "nokey": f"{shard}:no/such/key",
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sample_images(tmp_path_factory.mktemp("images"))


def test_page_inlines_every_readable_image_and_explains_the_rest(
    images: dict[str, str], tmp_path: Path
) -> None:
    readable = ["big", "alpha", "grey", "shard0", "shard1"]
    rows = [
        GalleryRow("readable", [Tile(images[r], f"caption {r}") for r in readable]),
        GalleryRow("unreadable", [Tile(images[r], r) for r in ("corrupt", "missing", "nokey")]),
        GalleryRow("repeated", [Tile(images["big"], "again")]),
    ]
    out = write_gallery_page(tmp_path / "page" / "index.html", "gallery", "an intro", rows)
    text = out.read_text(encoding="utf-8")
    thumbs = URI.findall(text)
    assert len(thumbs) == len(readable) + 1
    assert "<script" not in text and 'src="http' not in text and "<link" not in text
    assert 'src="file:' not in text and 'src="/' not in text
    kinds = dict(zip([*readable, "big"], (kind for kind, _ in thumbs)))
    assert kinds["alpha"] == "png" and kinds["big"] == "jpeg"  # transparency kept, photos small
    for _, data in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(data))) as thumb:
            assert max(thumb.size) <= 160
    assert len(base64.b64decode(thumbs[0][1])) < 20_000
    assert text.count('class="missing"') == 3
    assert (
        "UnidentifiedImageError" in text
        and "FileNotFoundError" in text
        and "no key &#x27;no/such/key&#x27;" in text
    )
    assert "caption shard1" in text and "an intro" in text


def test_page_escapes_text(images: dict[str, str], tmp_path: Path) -> None:
    evil = "<script>alert(1)</script> & <b>"
    out = write_gallery_page(
        tmp_path / "p.html", evil, evil, [GalleryRow(evil, [Tile(images["grey"], evil)])]
    )
    text = out.read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>" not in text
    assert (
        text.count("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;") == 5
    )  # title x2, intro, h2, caption


def test_page_refuses_an_existing_file_unless_told(images: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "index.html"
    out.write_text("keep me")
    rows = [GalleryRow("r", [Tile(images["grey"], "g")])]
    with pytest.raises(OutputExistsError, match=r"index\.html already exists: pass --overwrite"):
        write_gallery_page(out, "t", "i", rows)
    assert out.read_text() == "keep me"
    write_gallery_page(out, "t", "i", rows, overwrite=True)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html"]  # no temporary file left


def test_an_empty_page_is_still_a_page(tmp_path: Path) -> None:
    text = write_gallery_page(tmp_path / "e.html", "nothing", "no rows", []).read_text(encoding="utf-8")
    assert "<h1>nothing</h1>" in text and text.rstrip().endswith("</html>")
