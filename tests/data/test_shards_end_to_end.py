"""A tiny pre-training run and the k-NN evaluations give the same results on shards as on their folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sopvit.checkpoints.checkpoint import load_checkpoint
from sopvit.data.shard_writer import write_shards
from sopvit.eval.cache import split_features
from sopvit.eval.knn import KNNConfig
from sopvit.eval.knn import run as knn
from sopvit.train.online_knn import knn_of_backbone
from sopvit.train.trainer import Trainer
from tests.data.shard_images import labelled_folder
from tests.train.test_end_to_end import _assert_same_run
from tests.train.tiny import tiny_config, tiny_teacher

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:skipping unreadable image"),
    pytest.mark.filterwarnings("ignore:2 unreadable image file"),
]


def _knn_config(dataset: str, path: str) -> KNNConfig:
    return KNNConfig(
        dataset=dataset, path=path, image_size=16, in_chans=1, ks=(1, 3), batch_size=8, device="cpu"
    )


def test_pretraining_and_knn_on_shards_equal_the_folder_runs(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    labelled_folder(root / "train", per_class=12)
    labelled_folder(root / "test", per_class=4)
    for split in ("train", "test"):
        write_shards(root / split, tmp_path / "shards" / split, per_shard=10)
    pattern = f"{tmp_path}/shards/{{split}}"
    common = ("data.limit=null", "train.max_steps=3", "run.knn_limit=null")
    folder_run = tiny_config(tmp_path / "folder", "data.dataset=imagenet", f"data.path={root}", *common)
    Trainer(folder_run).fit()
    shard_run = tiny_config(tmp_path / "sharded", "data.dataset=shards", f"data.path={pattern}", *common)
    Trainer(shard_run).fit()
    a, b = (load_checkpoint(p / "checkpoint.pt") for p in (tmp_path / "folder", tmp_path / "sharded"))
    assert a["step"] == 3
    _assert_same_run(a, b)

    teacher = tiny_teacher(tmp_path / "sharded")
    on_folder, on_shards = _knn_config("imagenet", str(root)), _knn_config("shards", pattern)
    assert knn(teacher, on_folder) == knn(teacher, on_shards)
    for split in ("train", "test"):
        folder_f = split_features(teacher, on_folder, split, "cls")
        shard_f = split_features(teacher, on_shards, split, "cls")
        assert all(torch.equal(x, y) for x, y in zip(folder_f, shard_f, strict=True))

    folder_run.run.knn_dataset, folder_run.run.knn_path = "imagenet", str(root)
    shard_run.run.knn_dataset, shard_run.run.knn_path = "shards", pattern
    cpu = torch.device("cpu")
    assert knn_of_backbone(teacher, folder_run, cpu, k=3) == knn_of_backbone(teacher, shard_run, cpu, k=3)
