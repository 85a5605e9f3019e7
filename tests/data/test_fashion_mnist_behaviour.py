"""Fashion-MNIST loading pinned to its documented search order and validation.

Search order: explicit ``root`` (or ``$SOPVIT_FASHION_MNIST``), each as given or in torchvision's
``FashionMNIST/raw`` layout; else the Debian folder, then ``<cache>/FashionMNIST/raw``; else a torchvision
download into ``<cache>``. A folder counts only when it holds both the images and the labels file. The
Debian folder and the cache are redirected to tmp_path, and the torchvision class is replaced by a
stand-in that records its arguments and writes the files a download would: nothing is downloaded.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torchvision.datasets

import sopvit.data.fashion_mnist as fm
from sopvit.data import load_fashion_mnist

PREFIX = {"train": "train", "test": "t10k"}


def _write(
    folder: Path, split: str, n: int, *, labels: list[int] | None = None, kinds: tuple[str, ...] = ("i", "l")
) -> tuple[np.ndarray, np.ndarray]:
    """Uncompressed idx files with distinct content per split and size; returns (images, labels)."""
    images = ((np.arange(n * 784).reshape(n, 28, 28) * 5 + n + len(split)) % 256).astype(np.uint8)
    lab = np.array([i % 10 for i in range(n)] if labels is None else labels, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = PREFIX[split]
    if "i" in kinds:
        header = struct.pack(">IIII", 0x0803, n, 28, 28)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
    if "l" in kinds:
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, len(lab)) + lab.tobytes()
        )
    return images, lab


def _check(got: tuple[torch.Tensor, torch.Tensor], want: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = got
    assert torch.equal(images, torch.from_numpy(want[0]).unsqueeze(1))
    assert labels.dtype == torch.int64 and labels.tolist() == want[1].tolist()


@pytest.fixture()
def system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """No $SOPVIT_FASHION_MNIST; the Debian folder and the cache moved under tmp_path (both empty)."""
    monkeypatch.delenv(fm.FASHION_MNIST_ENV, raising=False)
    paths = {"debian": tmp_path / "debian", "cache": tmp_path / "cache"}
    monkeypatch.setattr(fm, "DEFAULT_FASHION_MNIST_DIR", str(paths["debian"]))
    monkeypatch.setattr(fm, "_CACHE_DIR", str(paths["cache"]))
    return paths


class _Download:
    """Stand-in for torchvision's FashionMNIST: records its arguments and writes the idx files."""

    calls: ClassVar[list[dict[str, Any]]] = []
    kinds: ClassVar[tuple[str, ...]] = ("i", "l")

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls.append({"root": root, "train": train, "download": download})
        split = "train" if train else "test"
        _write(Path(root) / "FashionMNIST" / "raw", split, 3 if train else 2, kinds=type(self).kinds)


@pytest.fixture()
def download(monkeypatch: pytest.MonkeyPatch) -> type[_Download]:
    monkeypatch.setattr(_Download, "calls", [])
    monkeypatch.setattr(_Download, "kinds", ("i", "l"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _Download)
    return _Download


def test_explicit_root_needs_both_files(tmp_path: Path) -> None:
    """A root holding only the images file is not the folder; its FashionMNIST/raw with both is."""
    _write(tmp_path, "train", 4, kinds=("i",))
    want = _write(tmp_path / "FashionMNIST" / "raw", "train", 5)
    _check(load_fashion_mnist("train", root=str(tmp_path)), want)


def test_not_found_message_names_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "test", 2)
    with pytest.raises(FileNotFoundError, match=r"not found in '.*' \(from root\)$"):
        load_fashion_mnist("train", root=str(tmp_path))
    monkeypatch.setenv(fm.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\(from \$SOPVIT_FASHION_MNIST\)$"):
        load_fashion_mnist("train")


def test_default_split_is_train_and_limit_one(tmp_path: Path) -> None:
    want = _write(tmp_path, "train", 4)
    _write(tmp_path, "test", 3)
    _check(load_fashion_mnist(root=str(tmp_path)), want)
    _check(load_fashion_mnist("train", root=str(tmp_path), limit=1), (want[0][:1], want[1][:1]))
    with pytest.raises(ValueError, match="limit"):
        load_fashion_mnist("train", root=str(tmp_path), limit=0)


def test_label_ten_is_out_of_range(tmp_path: Path) -> None:
    _write(tmp_path, "test", 3, labels=[9, 0, 10])
    with pytest.raises(ValueError, match=r"label 10 out of range 0\.\.9"):
        load_fashion_mnist("test", root=str(tmp_path))
    want = _write(tmp_path, "test", 3, labels=[9, 0, 9])
    _check(load_fashion_mnist("test", root=str(tmp_path)), want)


def test_system_folder_then_cache(system: dict[str, Path], download: type[_Download]) -> None:
    """The Debian folder is used only when it holds both files; else <cache>/FashionMNIST/raw."""
    _write(system["debian"], "test", 4, kinds=("i",))
    want = _write(system["cache"] / "FashionMNIST" / "raw", "test", 6)
    _check(load_fashion_mnist("test"), want)
    debian = _write(system["debian"], "test", 4)
    _check(load_fashion_mnist("test"), debian)
    assert download.calls == []


@pytest.mark.parametrize("split", ["train", "test"])
def test_download_into_cache_when_nothing_found(
    system: dict[str, Path], download: type[_Download], split: str
) -> None:
    images, labels = load_fashion_mnist(split)
    assert download.calls == [{"root": str(system["cache"]), "train": split == "train", "download": True}]
    n = 3 if split == "train" else 2
    assert images.shape == (n, 1, 28, 28) and labels.tolist() == list(range(n))


def test_incomplete_download_is_file_not_found(system: dict[str, Path], download: type[_Download]) -> None:
    download.kinds = ("i",)
    with pytest.raises(FileNotFoundError, match=r"test idx files missing in '.*FashionMNIST/raw'"):
        load_fashion_mnist("test")
