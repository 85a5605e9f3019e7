"""ImageFolderDataset: recursive scan, symlink cycles, labels and skipping of bad files."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sopvit.data import EvalTransform, ImageFolderDataset, scan_images

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _save(path: Path, size: int = 24, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (10, 120, 200)).save(path, format=fmt)
    return path


@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    """Two class folders with good files, every kind of bad file and a symlink cycle."""
    root = tmp_path / "root"
    _save(root / "a" / "good1.png")
    _save(root / "a" / "nested" / "deep" / "good2.JPG", fmt="JPEG")
    _save(root / "b" / "good3.bmp")
    _save(root / "b" / "good4.webp")
    _save(root / "b" / "x" / "good5.gif")
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    png = (root / "a" / "good1.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "b" / "text.jpg").write_text("not an image at all")
    (root / "b" / "notes.txt").write_text("ignored: not an image extension")
    unreadable = _save(root / "b" / "unreadable.png")
    unreadable.chmod(0)
    (root / "b" / "loop").symlink_to(root, target_is_directory=True)
    (root / "a" / "alias").symlink_to(root / "b" / "x", target_is_directory=True)
    return root


BAD = {"corrupt.jpg", "truncated.png", "zero.jpg", "text.jpg"} | (set() if IS_ROOT else {"unreadable.png"})


def test_scan_is_sorted_recursive_and_cycle_safe(messy: Path) -> None:
    paths = scan_images(messy)
    names = [os.path.basename(p) for p in paths]
    assert len(paths) == len(set(paths))
    expected = ["good1.png", "good2.JPG", "corrupt.jpg", "truncated.png", "zero.jpg", "good5.gif"]
    expected += ["good3.bmp", "good4.webp", "text.jpg", "unreadable.png"]
    # good5.gif is reachable as a/alias/ and b/x/ but listed once; notes.txt is no image.
    assert sorted(names) == sorted(expected)
    assert scan_images(messy) == paths


def test_bad_files_are_skipped_and_warned_once(messy: Path) -> None:
    ds = ImageFolderDataset(messy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    warned = {os.path.basename(str(w.message).split("'")[1]) for w in caught}
    assert warned == BAD
    assert len(caught) == len(BAD)
    for i, item in enumerate(items):
        name = os.path.basename(ds.paths[item["index"]])
        assert name not in BAD
        assert isinstance(item["image"], Image.Image) and item["image"].mode == "RGB"
        assert item["index"] == (i + item["skipped"]) % len(ds)
        assert (item["skipped"] > 0) == (os.path.basename(ds.paths[i]) in BAD)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        _ = [ds[i] for i in range(len(ds))]
    assert not again


def test_reason_is_named_in_warning(messy: Path) -> None:
    ds = ImageFolderDataset(messy)
    zero = next(i for i, p in enumerate(ds.paths) if p.endswith("zero.jpg"))
    with pytest.warns(RuntimeWarning, match=r"zero\.jpg.*UnidentifiedImageError"):
        ds[zero]


def test_decompression_bombs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "a_big.png", size=64)
    _save(tmp_path / "b_small.png", size=8)
    ds = ImageFolderDataset(tmp_path)
    for limit in (3000, 1000):  # 4096 px: warning range (limit, 2 * limit] and hard-error range
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        ds.unreadable.clear()
        with pytest.warns(RuntimeWarning, match="DecompressionBomb"):
            item = ds[0]
        assert item["index"] == 1 and item["skipped"] == 1


def test_labels_from_class_subfolders(messy: Path) -> None:
    ds = ImageFolderDataset(messy)
    assert ds.classes == ["a", "b"] and ds.num_classes == 2
    for path, label in zip(ds.paths, ds.labels):
        assert label == ds.class_to_idx[Path(os.path.relpath(path, messy)).parts[0]]
    assert all(label == -1 for label in ImageFolderDataset(messy, labelled=False).labels)


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    _save(tmp_path / "x.png")
    _save(tmp_path / "sub" / "y.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [] and ds[0]["label"] == -1
    with pytest.raises(ValueError, match="directly"):
        ImageFolderDataset(tmp_path, labelled=True)
    (tmp_path / "x.png").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(tmp_path, labelled=True)


def test_all_bad_raises(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_text("nope")
    ds = ImageFolderDataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="all 2 image files"):
            ds[1]


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(missing)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_index_bounds(messy: Path) -> None:
    ds = ImageFolderDataset(messy)
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds[-len(ds)]["index"] == ds[0]["index"]


def test_dataloader_with_workers(messy: Path) -> None:
    ds = ImageFolderDataset(messy, transform=EvalTransform(16))
    pickle.loads(pickle.dumps(ds))
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (len(ds), 3, 16, 16)
    assert int(sum(b["skipped"].sum() for b in batches)) >= len(BAD)
    loaded = {os.path.basename(ds.paths[i]) for b in batches for i in b["index"].tolist()}
    assert not loaded & BAD


def test_permission_denied_is_skipped_even_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    real_open = Image.open

    def deny(path: str, *args: object, **kwargs: object) -> Image.Image:
        if str(path).endswith("a.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", deny)
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"a\.png.*PermissionError"):
        item = ds[0]
    assert item["index"] == 1 and item["skipped"] == 1
