"""InMemoryDataset, load_cifar and build_dataset pinned to their documented behaviour.

CIFAR is tested on tiny files in torchvision's real pickle format (``cifar-10-batches-py``,
``cifar-100-python``) with torchvision's md5 checks bypassed, and on a recording stand-in for the
torchvision class where only the arguments it receives matter (root, train, download): no download
ever happens.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torchvision.datasets
import torchvision.datasets.cifar
from PIL import Image
from torch.utils.data import Subset

from sopvit.data import ImageFolderDataset, InMemoryDataset, build_dataset, load_cifar
from sopvit.data.fashion_mnist import FASHION_MNIST_ENV

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "sopvit")


def _hwc(n: int, offset: int) -> np.ndarray:
    """(n, 32, 32, 3) uint8 with every value distinct per position, so any axis mix-up shows."""
    return ((np.arange(n * 32 * 32 * 3).reshape(n, 32, 32, 3) + offset) % 251).astype(np.uint8)


def _write_cifar(root: Path, name: str) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Tiny CIFAR files in torchvision's pickle layout; returns the (HWC images, labels) per split."""
    if name == "cifar10":
        folder, label_key, meta = root / "cifar-10-batches-py", "labels", ("batches.meta", "label_names")
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file = "test_batch"
    else:
        folder, label_key, meta = root / "cifar-100-python", "fine_labels", ("meta", "fine_label_names")
        train_files, test_file = ["train"], "test"
    folder.mkdir(parents=True)
    expected: dict[str, tuple[np.ndarray, list[int]]] = {"train": (_hwc(0, 0), []), "test": (_hwc(0, 0), [])}
    for split, files in (("train", train_files), ("test", [test_file])):
        images, labels = [], []
        for j, file in enumerate(files):
            hwc = _hwc(2, 17 * j + (0 if split == "train" else 101))
            lab = [(3 * j + k + (0 if split == "train" else 5)) % 10 for k in range(2)]
            # torchvision stores each batch as (N, 3072) rows in CHW order.
            entry = {"data": hwc.transpose(0, 3, 1, 2).reshape(2, -1), label_key: lab}
            (folder / file).write_bytes(pickle.dumps(entry))
            images.append(hwc)
            labels += lab
        expected[split] = (np.concatenate(images), labels)
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"c{i}" for i in range(10)]}))
    return expected


@pytest.fixture()
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)


class _Recorder:
    """Stand-in for a torchvision CIFAR class: records its arguments, holds 5 known images."""

    calls: ClassVar[list[dict[str, Any]]] = []
    fail: ClassVar[bool] = False

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls.append({"root": root, "train": train, "download": download})
        if type(self).fail:
            raise RuntimeError("boom")
        self.data = _hwc(5, 0)
        self.targets = [4, 3, 2, 1, 0]


@pytest.fixture()
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[_Recorder]:
    monkeypatch.setattr(_Recorder, "calls", [])
    monkeypatch.setattr(_Recorder, "fail", False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _Recorder)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", _Recorder)
    return _Recorder


def _png(path: Path, colour: tuple[int, int, int] = (10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)


def _write_idx(folder: Path, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = ((np.arange(n * 784).reshape(n, 28, 28) * 7 + n) % 256).astype(np.uint8)
    labels = (np.arange(n) * 3 % 10).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + labels.tobytes())
    return images, labels


# ---------------------------------------------------------------- InMemoryDataset


def test_in_memory_errors_name_what_was_given() -> None:
    """The TypeError names the dtype and shape of a wrong tensor, or the type of a non-tensor; the
    labels ValueError names the wrong shape, or the type of a non-tensor."""
    with pytest.raises(TypeError, match=r"got torch\.float32 \(2, 1, 4, 4\)$"):
        InMemoryDataset(torch.zeros(2, 1, 4, 4))
    with pytest.raises(TypeError, match=r"got <class 'list'>$"):
        InMemoryDataset([[0]])  # type: ignore[arg-type]
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"shape \(3,\), got \(2,\)$"):
        InMemoryDataset(images, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(3,\), got <class 'list'>$"):
        InMemoryDataset(images, [0, 1, 2])  # type: ignore[arg-type]


def test_in_memory_labels_are_int64_and_repr() -> None:
    images = torch.arange(4 * 2 * 2, dtype=torch.uint8).view(4, 1, 2, 2)
    ds = InMemoryDataset(images, torch.tensor([0, 2, 1, 2], dtype=torch.int32))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 2, 1, 2]
    assert InMemoryDataset(images).labels.dtype == torch.int64
    assert repr(ds) == "InMemoryDataset(images=(4, 1, 2, 2), classes=3)"


def test_in_memory_negative_indices_wrap() -> None:
    """Index -n is the first item (as for a list) and reports index 0; -n - 1 is out of range."""
    images = torch.arange(3 * 4, dtype=torch.uint8).view(3, 1, 2, 2)
    ds = InMemoryDataset(images, torch.tensor([5, 6, 7]))
    item = ds[-3]
    assert item["index"] == 0 and item["label"] == 5 and torch.equal(item["image"], images[0])
    assert ds[-1]["index"] == 2
    with pytest.raises(IndexError):
        ds[-4]


# ---------------------------------------------------------------- load_cifar


@pytest.mark.usefixtures("no_md5")
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_reads_real_layout(tmp_path: Path, name: str) -> None:
    """Images come back as (N, 3, 32, 32) uint8 (HWC -> CHW), labels int64; the split picks the files."""
    expected = _write_cifar(tmp_path, name)
    for split in ("train", "test"):
        images, labels = load_cifar(name, split, root=str(tmp_path))
        hwc, lab = expected[split]
        assert images.dtype == torch.uint8 and images.shape == (len(lab), 3, 32, 32)
        assert images.is_contiguous()
        assert torch.equal(images, torch.from_numpy(hwc).permute(0, 3, 1, 2))
        assert labels.dtype == torch.int64 and labels.tolist() == lab
    # Default split is train; limit keeps the first samples of both tensors.
    images, labels = load_cifar(name, root=str(tmp_path), limit=3)
    hwc, lab = expected["train"]
    assert torch.equal(images, torch.from_numpy(hwc[:3]).permute(0, 3, 1, 2)) and labels.tolist() == lab[:3]


def test_load_cifar_passes_root_train_and_download(recorder: type[_Recorder], tmp_path: Path) -> None:
    """root defaults to ~/.cache/sopvit, train is split == "train", download defaults to False."""
    load_cifar("cifar10")
    load_cifar("cifar100", "test", root=str(tmp_path), download=True)
    load_cifar("cifar10", "train", root=str(tmp_path))
    assert recorder.calls == [
        {"root": CACHE_DIR, "train": True, "download": False},
        {"root": str(tmp_path), "train": False, "download": True},
        {"root": str(tmp_path), "train": True, "download": False},
    ]
    with pytest.raises(ValueError, match="split"):
        load_cifar("cifar10", "val")
    with pytest.raises(ValueError, match="name"):
        load_cifar("cifar1000")


def test_load_cifar_missing_message(recorder: type[_Recorder]) -> None:
    """A torchvision RuntimeError becomes FileNotFoundError; the download hint only without download."""
    recorder.fail = True
    with pytest.raises(FileNotFoundError) as info:
        load_cifar("cifar10", root="/data/c")
    assert str(info.value) == (
        "cifar10 not found or corrupted under '/data/c'; pass download=True to fetch it (boom)"
    )
    with pytest.raises(FileNotFoundError) as info:
        load_cifar("cifar100", "test", root="/data/c", download=True)
    assert str(info.value) == "cifar100 not found or corrupted under '/data/c' (boom)"


# ---------------------------------------------------------------- build_dataset


def test_build_cifar_forwards_path_download_limit(recorder: type[_Recorder], tmp_path: Path) -> None:
    ds = build_dataset("cifar100", str(tmp_path), split="val", download=True, limit=2)
    assert recorder.calls == [{"root": str(tmp_path), "train": False, "download": True}]
    assert isinstance(ds, InMemoryDataset) and len(ds) == 2
    assert ds.labels.tolist() == [4, 3]
    assert torch.equal(ds.images, torch.from_numpy(_hwc(2, 0)).permute(0, 3, 1, 2))
    full = build_dataset("cifar10", str(tmp_path))
    assert len(full) == 5 and recorder.calls[-1] == {"root": str(tmp_path), "train": True, "download": False}


def test_build_fashion_mnist_reads_the_given_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path is the idx folder (not $SOPVIT_FASHION_MNIST or the system copy); limit=1 is valid."""
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    images, labels = _write_idx(tmp_path / "fm", "train", 6)
    ds = build_dataset("fashion_mnist", str(tmp_path / "fm"))
    assert isinstance(ds, InMemoryDataset) and len(ds) == 6
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images)) and ds.labels.tolist() == labels.tolist()
    one = build_dataset("fashion_mnist", str(tmp_path / "fm"), limit=1)
    assert len(one) == 1 and one[0]["label"] == int(labels[0])
    with pytest.raises(ValueError, match="limit"):
        build_dataset("fashion_mnist", str(tmp_path / "fm"), limit=0)


def test_build_imagenet_uses_transform_and_requires_class_layout(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        _png(tmp_path / "val" / cls / "0.png")
    ds = build_dataset("imagenet", str(tmp_path), split="val", transform=lambda img: ("t", img.size))
    assert isinstance(ds, ImageFolderDataset)
    assert ds[1]["image"] == ("t", (4, 4)) and ds[1]["label"] == 1
    # An image directly in the split folder breaks the ImageNet layout: an error, not -1 labels.
    _png(tmp_path / "val" / "stray.png")
    with pytest.raises(ValueError, match="directly"):
        build_dataset("imagenet", str(tmp_path), split="val")


def test_build_folder_forwards_transform_and_labelled(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        _png(tmp_path / cls / "0.png")
    ds = build_dataset("folder", str(tmp_path), transform=lambda img: img.mode + "!")
    assert ds[0]["image"] == "RGB!" and ds[1]["label"] == 1  # labelled=None: class layout detected
    unlabelled = build_dataset("folder", str(tmp_path), labelled=False)
    assert isinstance(unlabelled, ImageFolderDataset)
    assert unlabelled.labels == [-1, -1] and unlabelled.classes == []


def test_build_folder_limit(tmp_path: Path) -> None:
    """limit < n gives a Subset of the first items; limit >= n gives the folder data set itself."""
    for i, colour in enumerate([(1, 1, 1), (2, 2, 2), (3, 3, 3)]):
        _png(tmp_path / f"{i}.png", colour)
    sub = build_dataset("folder", str(tmp_path), limit=2)
    assert isinstance(sub, Subset) and len(sub) == 2
    assert sub[1]["index"] == 1 and sub[1]["image"].getpixel((0, 0)) == (2, 2, 2)
    for limit in (3, 4):
        whole = build_dataset("folder", str(tmp_path), limit=limit)
        assert isinstance(whole, ImageFolderDataset) and len(whole) == 3
    assert len(build_dataset("folder", str(tmp_path), limit=1)) == 1
