"""augment_on=device on image folders: the per-sample path's images and skips, exact resume, rank halves."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from sopvit.config import ConfigError, load_config
from sopvit.data.config import DataConfig
from sopvit.data.pipeline import Batch, PretrainInputs
from sopvit.data.prefetch import prefetch
from sopvit.recipe.config import pretrain_config_type

CPU = torch.device("cpu")
# Each process warns once per unreadable file; tests/data/test_decode.py pins the message.
pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images: JPEGs of three sizes, grayscale and progressive JPEGs, PNGs, and two unreadable files."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 30), (30, 44), (64, 48)]
    for i in range(24):
        w, h = sizes[i % 3]
        pixels = (torch.rand(h, w, 3, generator=g) * 255).byte().numpy()
        image = Image.fromarray(pixels)
        if i in (5, 17):
            (root / f"{i:02d}.jpg").write_bytes(b"not an image at all")
        elif i % 7 == 3:
            image.save(root / f"{i:02d}.png")
        elif i % 5 == 1:
            image.convert("L").save(root / f"{i:02d}.jpg", quality=90)
        else:
            image.save(root / f"{i:02d}.jpg", quality=90, progressive=i % 2 == 0)
    return root


def _data(folder: Path, augment_on: str, workers: int = 0) -> DataConfig:
    return DataConfig(
        dataset="folder",
        path=str(folder),
        global_size=16,
        local_size=8,
        n_locals=2,
        mask_ratio=(0.1, 0.5),
        mask_prob=0.5,
        augment_on=augment_on,  # type: ignore[arg-type]
        num_workers=workers,
    )


def _batches(
    cfg: DataConfig, start: int, stop: int, batch: int = 4, world: int = 1, rank: int = 0
) -> list[Batch]:
    inputs = PretrainInputs(cfg, patch_size=4, batch_size=batch, world=world, rank=rank, seed=11)
    return list(inputs.batches(start, stop, CPU))


def _equal(a: Batch, b: Batch) -> bool:
    same_crops = all(torch.equal(x, y) for x, y in zip(a.crops, b.crops, strict=True))
    return (
        same_crops and torch.equal(a.masks, b.masks) and torch.equal(a.ids, b.ids) and a.skipped == b.skipped
    )


def test_device_path_loads_the_images_and_skips_the_files_the_per_sample_path_does(folder: Path) -> None:
    device = _batches(_data(folder, "device"), 0, 12)  # two epochs of 6 micro-batches
    workers = _batches(_data(folder, "workers"), 0, 12)
    for a, b in zip(device, workers, strict=True):
        assert torch.equal(a.ids, b.ids) and a.skipped == b.skipped
        assert (
            [c.shape for c in a.crops]
            == [c.shape for c in b.crops]
            == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
        )
        assert a.masks.shape == b.masks.shape == (8, 4, 4)
    assert sum(b.skipped for b in device) == 4  # two bad files, met once per epoch
    pngs = [int(i) for b in device for i in b.ids if i % 7 == 3]
    assert sum(b.cpu_decoded for b in device) == len(pngs) > 0


def test_a_resumed_stream_is_the_tail_of_the_uninterrupted_one(folder: Path) -> None:
    straight = _batches(_data(folder, "device"), 0, 9)
    resumed = _batches(_data(folder, "device"), 4, 9)
    assert all(_equal(a, b) for a, b in zip(straight[4:], resumed, strict=True))


def test_workers_only_read_bytes_and_change_nothing(folder: Path) -> None:
    inline = _batches(_data(folder, "device"), 0, 6)
    pooled = _batches(_data(folder, "device", workers=2), 0, 6)
    assert all(_equal(a, b) for a, b in zip(inline, pooled, strict=True))


@pytest.mark.parametrize("dataset", ["folder", "fashion_mnist"])
def test_two_ranks_get_the_halves_of_the_single_process_batch(folder: Path, dataset: str) -> None:
    cfg = _data(folder, "device")
    if dataset == "fashion_mnist":
        cfg = replace(cfg, dataset="fashion_mnist", path=None, in_chans=1, limit=64)
    one = _batches(cfg, 1, 4, batch=8)
    for rank in (0, 1):
        mine = _batches(cfg, 1, 4, world=2, rank=rank)
        for whole, part in zip(one, mine, strict=True):
            half = slice(4 * rank, 4 * rank + 4)
            assert all(torch.equal(w[half], p) for w, p in zip(whole.crops, part.crops, strict=True))
            views = whole.masks.view(2, 8, 4, 4)[:, half].flatten(0, 1)
            assert torch.equal(views, part.masks) and torch.equal(whole.ids[half], part.ids)


def test_the_old_key_names_its_replacement() -> None:
    with pytest.raises(
        ConfigError, match=r"'data.batched_augment' was retired: write data.augment_on: device"
    ):
        load_config(pretrain_config_type(), None, ["data.batched_augment=true"])


def test_prefetch_keeps_the_order_and_raises_the_producers_error_at_its_batch() -> None:
    def produce() -> Iterator[Batch]:
        for i in range(3):
            yield Batch(
                crops=[torch.full((1,), float(i))], masks=torch.zeros(1), ids=torch.tensor([i]), skipped=0
            )
        raise OSError("disk gone")

    stream = prefetch(produce(), CPU)
    assert [int(next(stream).ids) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


def test_closing_the_stream_early_stops_the_producer() -> None:
    produced, closed = [], threading.Event()

    def produce() -> Iterator[Batch]:
        try:
            for i in range(1000):
                produced.append(i)
                yield Batch(crops=[torch.zeros(1)], masks=torch.zeros(1), ids=torch.tensor([i]), skipped=0)
        finally:
            closed.set()

    stream = prefetch(produce(), CPU, depth=2)
    next(stream)
    stream.close()
    assert closed.is_set() and len(produced) <= 5  # one consumed, at most depth + 2 made ahead
    assert not any(t.name == "sopvit-prefetch" for t in threading.enumerate())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_device_paths_agree_on_boxes_masks_and_images(folder: Path) -> None:
    from sopvit.data.batched import BatchMultiCrop
    from sopvit.data.counter_rng import image_keys

    cfg = _data(folder, "device")
    runs = {}
    for name in ("cpu", "cuda"):
        inputs = PretrainInputs(cfg, patch_size=4, batch_size=4, world=1, rank=0, seed=11)
        runs[name] = list(inputs.batches(0, 6, torch.device(name)))
    for a, b in zip(runs["cpu"], runs["cuda"], strict=True):
        assert torch.equal(a.ids, b.ids.cpu()) and a.skipped == b.skipped
        assert torch.equal(a.masks, b.masks.cpu())
        for x, y in zip(a.crops, b.crops, strict=True):
            assert (x - y.cpu()).abs().mean() < 0.05  # nvJPEG's IDCT and CUDA's roi_align round differently
    # The crop boxes come from the image sizes and keys alone: equal decoded sizes give equal boxes.
    inputs = PretrainInputs(cfg, patch_size=4, batch_size=4, world=1, rank=0, seed=11)
    images = [torch.zeros(3, 30, 40, dtype=torch.uint8, device=d) for d in ("cpu", "cuda")]
    keys = image_keys(11, 0, torch.tensor([3]))
    cpu, cuda = (BatchMultiCrop(inputs.spec).params([im], keys) for im in images)
    assert all(torch.equal(p.boxes, q.boxes) for p, q in zip(cpu, cuda, strict=True))
