"""Tar shards read back as the folder they were packed from: patterns, the index cache, items, batches."""

from __future__ import annotations

import os
import pickle
import tarfile
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from sopvit.config import ConfigError, load_config
from sopvit.data import shard_index
from sopvit.data import shards as shards_module
from sopvit.data.config import DataConfig
from sopvit.data.datasets import build_dataset
from sopvit.data.decode import BatchDecoder, FileBytesDataset
from sopvit.data.image_folder import ImageFolderDataset
from sopvit.data.pipeline import Batch, PretrainInputs
from sopvit.data.shard_index import load_index
from sopvit.data.shard_writer import write_shards
from sopvit.data.shards import ShardDataset, expand_braces, resolve_shards
from sopvit.recipe.config import pretrain_config_type
from tests.data.shard_images import jpeg_bytes, labelled_folder, tar_of

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image")


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a labelled folder of 30 images, two of them bad; its shards, 7 images per shard)."""
    root = tmp_path_factory.mktemp("shards")
    folder = labelled_folder(root / "images")
    write_shards(folder, root / "out", per_shard=7)
    return folder, root / "out"


def test_brace_expansion_ranges_lists_and_literals() -> None:
    assert expand_braces("s-{000..003}.tar") == [f"s-{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_braces("{x,{y,z}1}") == ["x", "y1", "z1"]
    assert expand_braces("d/{split}/s.tar") == ["d/{split}/s.tar"]
    assert expand_braces("{2..0}") == ["2", "1", "0"]


def test_patterns_globs_and_folders_name_the_shards_in_sorted_order(packed: tuple[Path, Path]) -> None:
    _, out = packed
    names = [str(out / f"shard-{i:06d}.tar") for i in range(5)]
    assert resolve_shards(f"{out}/shard-{{000000..000004}}.tar") == names
    assert resolve_shards(f"{out}/shard-{{000003,000000}}.tar") == [names[0], names[3]]
    assert resolve_shards(f"{out}/*.tar") == names
    assert resolve_shards(str(out)) == names  # via shards.json


def test_pattern_errors_are_one_line(packed: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = packed
    with pytest.raises(
        FileNotFoundError, match=r"shard not found: '.*shard-000005.tar' and 4 more, listed by"
    ):
        resolve_shards(f"{out}/shard-{{000000..000009}}.tar")
    with pytest.raises(FileNotFoundError, match=r"no shard matches data.path '.*/nope-\*.tar'"):
        resolve_shards(f"{out}/nope-*.tar")
    with pytest.raises(FileNotFoundError, match=r"no shard matches data.path '.*/\*.tar'"):
        resolve_shards(str(tmp_path))
    (tmp_path / "fake.tar").write_bytes(b"certainly not a tar archive" * 40)
    with pytest.raises(ValueError, match=r"not a tar file: '.*fake.tar'"):
        ShardDataset(str(tmp_path / "fake.tar"))
    lonely = tar_of(tmp_path / "lonely.tar", {"0.jpg": jpeg_bytes(), "1.cls": b"3"})
    with pytest.raises(ValueError, match=r"sample '1' has no image member"):
        ShardDataset(str(lonely))
    bad_label = tar_of(tmp_path / "label.tar", {"0.jpg": jpeg_bytes(), "0.cls": b"cat"})
    with pytest.raises(ValueError, match=r"0.cls: the label is not an integer"):
        ShardDataset(str(bad_label))


def test_members_group_by_key_and_labels_are_optional(tmp_path: Path) -> None:
    shard = tar_of(
        tmp_path / "mixed.tar",
        {
            "a/x.jpg": jpeg_bytes(),
            "a/x.cls": b" 4\n",
            "a/x.json": b"{}",
            "y.seg.PNG": b"",
            "z.jpeg": jpeg_bytes(),
        },
    )
    index = load_index(str(shard))
    assert index.keys == ["a/x", "y", "z"] and index.labels == [4, -1, -1]
    assert ShardDataset(str(shard)).paths[0] == f"{shard}:a/x"


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_in_extended_headers_are_indexed(tmp_path: Path, fmt: int) -> None:
    long = "deep/" * 30 + "k"
    shard = tar_of(
        tmp_path / "long.tar", {f"{long}.jpg": jpeg_bytes(), f"{long}.cls": b"2", "z.png": b"\x89"}, fmt
    )
    index = load_index(str(shard))
    assert index.keys == [long, "z"] and index.labels == [2, -1] and index.sizes[1] == 1
    assert ShardDataset(str(shard)).read_bytes(0).tobytes() == jpeg_bytes()


def test_a_truncated_or_empty_shard_is_named(tmp_path: Path) -> None:
    shard = tar_of(tmp_path / "t.tar", {"0.jpg": jpeg_bytes(), "1.jpg": jpeg_bytes((64, 64))})
    second, intact = load_index(str(shard)).offsets[1], shard.read_bytes()
    shard.write_bytes(intact[: second + 10])
    with pytest.raises(ValueError, match=r"not a tar file: '.*t.tar' \(member '1.jpg' is truncated\)"):
        load_index(str(shard))
    shard.write_bytes(intact[: second - 400])  # within the second header
    with pytest.raises(
        ValueError, match=rf"not a tar file: '.*t.tar' \(truncated header at byte {second - 512}\)"
    ):
        load_index(str(shard))
    (tmp_path / "e.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a tar file: '.*e.tar' \(empty file\)"):
        load_index(str(tmp_path / "e.tar"))


def test_the_index_is_cached_beside_the_shard_and_rebuilt_when_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = tar_of(tmp_path / "s.tar", {"0.jpg": jpeg_bytes(), "1.jpg": jpeg_bytes()})
    built: list[str] = []
    real_build = shard_index.build_index
    monkeypatch.setattr(shard_index, "build_index", lambda s: built.append(s) or real_build(s))
    assert load_index(str(shard)).keys == ["0", "1"]
    assert (tmp_path / "s.tar.idx.json").is_file() and len(built) == 1
    assert load_index(str(shard)).keys == ["0", "1"] and len(built) == 1  # reused
    tar_of(shard, {"0.jpg": jpeg_bytes(), "1.jpg": jpeg_bytes(), "2.jpg": jpeg_bytes()})
    os.utime(shard, ns=(1, 1))  # the size changed anyway; a new mtime alone must be enough too
    assert load_index(str(shard)).keys == ["0", "1", "2"] and len(built) == 2
    os.utime(shard, ns=(2, 2))
    assert load_index(str(shard)).keys == ["0", "1", "2"] and len(built) == 3


def test_a_read_only_shard_folder_caches_the_index_in_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = tar_of(tmp_path / "ro" / "s.tar", {"0.jpg": jpeg_bytes()})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real_mkstemp = tempfile.mkstemp

    def read_only(*args: object, dir: str = "", **kwargs: object) -> tuple[int, str]:
        # chmod does not stop root, so the denial is simulated where the folder would refuse it
        if Path(dir) == shard.parent:
            raise PermissionError(13, "Read-only file system", dir)
        return real_mkstemp(*args, dir=dir, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert load_index(str(shard)).keys == ["0"]
    assert not (shard.parent / "s.tar.idx.json").exists()
    cached = list((tmp_path / "home" / ".cache" / "sopvit" / "shard-index").glob("*.json"))
    assert len(cached) == 1
    monkeypatch.setattr(shard_index, "build_index", lambda s: pytest.fail("the cached index was not used"))
    assert load_index(str(shard)).keys == ["0"]


def test_items_are_the_folders_items(packed: tuple[Path, Path]) -> None:
    folder_dir, out = packed
    folder, shards = ImageFolderDataset(folder_dir), ShardDataset(str(out))
    assert len(shards) == len(folder) == 30 and shards.classes == folder.classes == ["ant", "bee", "cat"]
    assert shards.labels == folder.labels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(len(folder)):
            a, b = folder[i], shards[i]
            assert (a["index"], a["label"], a["skipped"]) == (b["index"], b["label"], b["skipped"])
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    bad = [str(w.message) for w in caught if "shard-" in str(w.message)]
    assert len(bad) == 2 and f"'{out}/shard-000000.tar:000000003'" in bad[0]
    assert shards[3]["index"] == 4 and shards[3]["skipped"] == 1


def test_the_device_path_reads_the_same_bytes_and_decodes_the_same_batch(packed: tuple[Path, Path]) -> None:
    folder_dir, out = packed
    folder, shards = ImageFolderDataset(folder_dir), ShardDataset(str(out))
    by_file, by_shard = FileBytesDataset(folder), FileBytesDataset(shards)
    for i in range(len(folder)):
        assert torch.equal(by_file[i]["data"], by_shard[i]["data"])
    items = [i for i in range(len(folder)) if i % 2 == 1]
    a = BatchDecoder()([by_file[i] for i in items], by_file, CPU, 3)
    b = BatchDecoder()([by_shard[i] for i in items], by_shard, CPU, 3)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels) and a.skipped == b.skipped
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))


def _pixel_sum(img: object) -> int:
    return int(np.asarray(img, dtype=np.int64).sum())


def test_workers_open_their_own_files(packed: tuple[Path, Path]) -> None:
    _, out = packed
    shards = ShardDataset(str(out), transform=_pixel_sum)
    inline = [int(shards[i]["image"]) for i in range(len(shards))]  # opens descriptors before the fork
    loader = DataLoader(shards, batch_size=5, num_workers=2)
    pooled = [int(x) for batch in loader for x in batch["image"]]
    assert pooled == inline
    clone = pickle.loads(pickle.dumps(shards))
    assert clone._fds == {} and int(clone[0]["image"]) == inline[0]


def test_open_shards_are_capped_per_process(
    packed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = packed
    monkeypatch.setattr(shards_module, "_MAX_OPEN", 2)
    shards, whole = ShardDataset(str(out)), ShardDataset(str(out))
    for i in [0, 29, 8, 15, 1, 22, 9, 29]:  # shards 0 4 1 2 0 3 1 4
        assert np.array_equal(shards.read_bytes(i), whole.read_bytes(i))
        assert len(shards._fds) <= 2
    assert list(shards._fds) == [1, 4]


def test_build_dataset_names_shards_with_limit_and_split(packed: tuple[Path, Path]) -> None:
    _, out = packed
    limited = build_dataset("shards", f"{out.parent}/{{split}}", "out", limit=10)
    assert isinstance(limited, Subset) and len(limited) == 10
    assert isinstance(limited.dataset, ShardDataset) and len(limited.dataset) == 30
    with pytest.raises(ValueError, match="dataset 'shards' needs a path"):
        build_dataset("shards", None)
    with pytest.raises(ConfigError, match=r"path: is required for dataset 'shards' \(the tar shards"):
        load_config(pretrain_config_type(), None, ["data.dataset=shards"])


def _data(path: Path, dataset: str, augment_on: str) -> DataConfig:
    return DataConfig(
        dataset=dataset,  # type: ignore[arg-type]
        path=str(path),
        global_size=16,
        local_size=8,
        n_locals=2,
        mask_ratio=(0.1, 0.5),
        mask_prob=0.5,
        augment_on=augment_on,  # type: ignore[arg-type]
        num_workers=0,
    )


def _batches(cfg: DataConfig, start: int, stop: int) -> list[Batch]:
    inputs = PretrainInputs(cfg, patch_size=4, batch_size=6, world=1, rank=0, seed=5)
    return list(inputs.batches(start, stop, CPU))


@pytest.mark.parametrize("augment_on", ["workers", "device"])
@pytest.mark.parametrize("limit", [None, 18])
def test_shards_serve_the_folders_batches(
    packed: tuple[Path, Path], augment_on: str, limit: int | None
) -> None:
    folder_dir, out = packed
    from_folder = replace(_data(folder_dir, "folder", augment_on), limit=limit)
    from_shards = replace(_data(out / "shard-{000000..000004}.tar", "shards", augment_on), limit=limit)
    steps = 30 // 6 if limit is None else 18 // 6
    a, b = _batches(from_folder, 1, steps + 2), _batches(from_shards, 1, steps + 2)  # into the 2nd epoch
    assert sum(x.skipped for x in a) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.ids, y.ids) and x.skipped == y.skipped and x.cpu_decoded == y.cpu_decoded
        assert torch.equal(x.masks, y.masks)
        assert all(torch.equal(c, d) for c, d in zip(x.crops, y.crops, strict=True))
