"""Fashion-MNIST idx loading, in-memory data sets and the build_dataset factory."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sopvit.data import DATASET_NAMES, ImageFolderDataset, InMemoryDataset, build_dataset, load_fashion_mnist
from sopvit.data.fashion_mnist import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_ENV, read_idx

HAVE_FMNIST = Path(DEFAULT_FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not in {DEFAULT_FASHION_MNIST_DIR}")


def _write_idx(folder: Path, split: str, n: int, *, gz: bool = True, n_labels: int | None = None) -> None:
    prefix = {"train": "train", "test": "t10k"}[split]
    rng = np.random.default_rng(0)
    images = struct.pack(">IIII", 0x0803, n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()
    n_labels = n if n_labels is None else n_labels
    labels = struct.pack(">II", 0x0801, n_labels) + (np.arange(n_labels) % 10).astype(np.uint8).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


@needs_fmnist
def test_real_fashion_mnist() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert torch.equal(labels.unique(), torch.arange(10))
        assert int(images.max()) == 255
    images, labels = load_fashion_mnist("test", limit=100)
    assert images.shape == (100, 1, 28, 28) and labels.shape == (100,)


def test_synthetic_idx_files_gz_and_raw(tmp_path: Path) -> None:
    _write_idx(tmp_path / "gz", "train", 12)
    _write_idx(tmp_path / "raw", "test", 7, gz=False)
    images, labels = load_fashion_mnist("train", root=str(tmp_path / "gz"))
    assert images.shape == (12, 1, 28, 28) and labels.tolist() == [i % 10 for i in range(12)]
    images, _ = load_fashion_mnist("test", root=str(tmp_path / "raw"), limit=3)
    assert images.shape == (3, 1, 28, 28)
    images[0, 0, 0, 0] = 1  # the returned tensor must be writable


def test_env_var_and_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx(tmp_path / "FashionMNIST" / "raw", "test", 5)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    assert load_fashion_mnist("test")[0].shape == (5, 1, 28, 28)
    with pytest.raises(FileNotFoundError, match=FASHION_MNIST_ENV):
        load_fashion_mnist("train")


def test_missing_files_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_fashion_mnist("train", root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_corrupt_files_raise_value_error_naming_path(tmp_path: Path) -> None:
    _write_idx(tmp_path, "train", 4)
    images_gz = tmp_path / "train-images-idx3-ubyte.gz"
    good = images_gz.read_bytes()
    images_gz.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz"):
        load_fashion_mnist("train", root=str(tmp_path))
    images_gz.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="corrupt"):
        load_fashion_mnist("train", root=str(tmp_path))
    images_gz.write_bytes(gzip.compress(struct.pack(">IIII", 0x0801, 4, 28, 28)))
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("train", root=str(tmp_path))
    raw = gzip.decompress(good)
    images_gz.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("train", root=str(tmp_path))
    images_gz.write_bytes(gzip.compress(raw + b"junk"))
    with pytest.raises(ValueError, match="trailing"):
        load_fashion_mnist("train", root=str(tmp_path))
    _write_idx(tmp_path, "train", 4, n_labels=3)
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist("train", root=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        read_idx(str(tmp_path / "absent.gz"), 0x0803)


def test_in_memory_dataset() -> None:
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    ds = InMemoryDataset(images, torch.tensor([0, 1, 2, 1, 0]), transform=lambda x: x.float())
    item = ds[3]
    assert set(item) == {"image", "index", "label", "skipped"}
    assert item["index"] == 3 and item["label"] == 1 and item["skipped"] == 0
    assert torch.equal(item["image"], images[3].float())
    assert ds.num_classes == 3 and len(ds) == 5
    assert InMemoryDataset(images)[0]["label"] == -1
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(TypeError, match="uint8"):
        InMemoryDataset(images.float())
    with pytest.raises(ValueError, match="labels"):
        InMemoryDataset(images, torch.zeros(4, dtype=torch.int64))


def test_build_dataset(tmp_path: Path) -> None:
    _write_idx(tmp_path / "fm", "test", 9)
    ds = build_dataset("fashion_mnist", str(tmp_path / "fm"), split="val", limit=4)
    assert isinstance(ds, InMemoryDataset) and len(ds) == 4
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "inet" / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "inet" / split / cls / "0.png")
    inet = build_dataset("imagenet", str(tmp_path / "inet"), split="val")
    assert isinstance(inet, ImageFolderDataset) and inet.classes == ["cat", "dog"]
    folder = build_dataset("folder", str(tmp_path / "inet"), limit=3)
    assert len(folder) == 3
    with pytest.raises(ValueError, match="fashion_mnist, cifar10"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="path"):
        build_dataset("folder")
    with pytest.raises(FileNotFoundError, match="test"):
        build_dataset("imagenet", str(tmp_path / "inet"), split="test")
    assert set(DATASET_NAMES) == {"fashion_mnist", "cifar10", "cifar100", "folder", "imagenet", "shards"}


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True"):
        build_dataset("cifar10", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        build_dataset("cifar100", str(tmp_path), split="holdout")
