"""ImageFolderDataset and scan_images pinned to their documented behaviour: symlinked folders are followed
once, class folders are the immediate subdirectories, labelling errors name the problem, the transform
is applied, and only DecompressionBombWarning (not any warning) makes a file bad."""

from __future__ import annotations

import io
import os
import shutil
import struct
import warnings
from pathlib import Path

import pytest
from PIL import Image

import sopvit.data.image_folder as image_folder
from sopvit.data import ImageFolderDataset, scan_images


def _png(path: Path, colour: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def _names(paths: list[str], root: Path) -> list[str]:
    return [Path(os.path.relpath(p, root)).as_posix() for p in paths]


def test_symlinked_folders_outside_root_are_followed_once(tmp_path: Path) -> None:
    """Two links to the same outside folder give its files once (under the first link); the scan
    then goes on with the remaining folders."""
    outside, root = tmp_path / "outside", tmp_path / "root"
    _png(outside / "x.png")
    _png(outside / "sub" / "y.png")
    root.mkdir()
    (root / "l1").symlink_to(outside, target_is_directory=True)
    (root / "l2").symlink_to(outside, target_is_directory=True)
    _png(root / "z" / "w.png")
    assert _names(scan_images(root), root) == ["l1/x.png", "l1/sub/y.png", "z/w.png"]


def test_sibling_names_are_resolved_under_their_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b/a is not mistaken for the already visited a/, whatever the working directory."""
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "b" / "a" / "2.png")
    monkeypatch.chdir(tmp_path)
    assert _names(scan_images(tmp_path), tmp_path) == ["a/1.png", "b/a/2.png"]


def test_class_folders_ignore_files_and_links_back_to_root(tmp_path: Path) -> None:
    """A non-image file next to the class folders and a symlink to the root are not classes."""
    _png(tmp_path / "a" / "0.png")
    _png(tmp_path / "b" / "0.png")
    (tmp_path / "README.txt").write_text("not a class")
    (tmp_path / "self").symlink_to(tmp_path, target_is_directory=True)
    ds = ImageFolderDataset(tmp_path, labelled=True)
    assert ds.classes == ["a", "b"] and ds.labels == [0, 1]


def test_labelling_error_messages(tmp_path: Path) -> None:
    root = tmp_path / "direct"
    _png(root / "x.png")
    with pytest.raises(ValueError, match=r"by class subfolder: it contains images directly$"):
        ImageFolderDataset(root, labelled=True)
    root = tmp_path / "missing"
    _png(root / "a" / "0.png")
    for name in "bcdefg":
        (root / name).mkdir()
    with pytest.raises(ValueError, match=r"subfolders without images: \['b', 'c', 'd', 'e', 'f'\]$"):
        ImageFolderDataset(root, labelled=True)


def test_class_folder_gone_after_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the class folder vanishes between the scan and the labelling, labelling reports it."""
    path = str(_png(tmp_path / "a" / "0.png"))
    monkeypatch.setattr(image_folder, "scan_images", lambda root: [path])
    shutil.rmtree(tmp_path / "a")
    with pytest.raises(ValueError, match=r"by class subfolder: it has no subfolders$"):
        ImageFolderDataset(tmp_path, labelled=True)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [] and ds.labels == [-1]


def test_repr_and_transform(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "0.png", (1, 2, 3))
    _png(tmp_path / "b" / "0.png", (4, 5, 6))
    ds = ImageFolderDataset(tmp_path, transform=lambda img: img.getpixel((0, 0)))
    assert repr(ds) == f"ImageFolderDataset(root={str(tmp_path)!r}, n=2, classes=2)"
    assert ds[1] == {"image": (4, 5, 6), "index": 1, "label": 1, "skipped": 0}


def _palette_png_with_byte_transparency() -> bytes:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([v % 256 for v in range(768)])
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=b"\x00\x80")
    return buf.getvalue()


def _jpeg_with_broken_exif_tag() -> bytes:
    """A JPEG whose EXIF says orientation 6 and has a tag pointing past the data (PIL warns, skips it)."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 2)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">HHII", 0x010E, 2, 100, 1000)
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 10, 10)).save(buf, "JPEG", exif=b"Exif\x00\x00" + tiff + b"\x00" * 4)
    return buf.getvalue()


def test_other_pil_warnings_do_not_make_a_file_bad(tmp_path: Path) -> None:
    """PIL's warnings other than DecompressionBombWarning reach the caller; the file still loads."""
    (tmp_path / "p.png").write_bytes(_palette_png_with_byte_transparency())
    (tmp_path / "q.jpg").write_bytes(_jpeg_with_broken_exif_tag())
    ds = ImageFolderDataset(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p, q = ds[0], ds[1]
    assert (p["index"], p["skipped"], q["index"], q["skipped"]) == (0, 0, 1, 0)
    assert p["image"].mode == "RGB" and p["image"].size == (4, 4)
    assert q["image"].size == (8, 16)  # orientation 6 applied
    messages = [str(w.message) for w in caught]
    assert not any("skipping" in m for m in messages)
    assert any("Transparency" in m for m in messages) and any("Skipping tag" in m for m in messages)
