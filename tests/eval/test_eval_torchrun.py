"""`torchrun --nproc_per_node 2 sopvit eval ...` shards extraction and reports what one process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sopvit.eval.cache import extract_dataset_features
from sopvit.train.trainer import Trainer
from tests.gloo import run_gloo_ranks
from tests.train.tiny import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torchrun") / "run"
    Trainer(tiny_config(path, "train.max_steps=1")).fit()
    return path


def _eval(nproc: int, *args: str) -> dict[str, float]:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    )
    cmd = [sys.executable, *launcher, "-m", "sopvit", "eval", *args]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # only rank 0 reports
    return dict(json.loads(lines[0]))


@pytest.mark.slow
def test_two_ranks_report_the_single_process_numbers(run_dir: Path) -> None:
    # 301 images: the two shards differ in size, so order restoration after the gather is exercised
    common = ["--checkpoint", str(run_dir), "image_size=16", "limit=301"]
    for name, extra in (("knn", ["ks=[5,20]"]), ("linear", ["epochs=2", "lrs=[0.01,0.1]", "layers=last2"])):
        one, two = _eval(1, name, *common, *extra), _eval(2, name, *common, *extra)
        assert one.keys() == two.keys()
        for key, value in one.items():
            if isinstance(value, float):
                assert two[key] == pytest.approx(value, abs=1e-3), (name, key)


def _extract(rank: int, run_dir: Path, out: Path) -> None:
    from sopvit.export import load_pretrained

    backbone = load_pretrained(run_dir)
    result = {
        limit: extract_dataset_features(
            backbone, "fashion_mnist", None, "test", 16, 1, 4, limit, torch.device("cpu"), "last2"
        )
        for limit in (1, 7)  # 1 image: rank 1 holds nothing and must still join the gathers
    }
    torch.save(result, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_extraction_on_two_gloo_ranks_equals_one_process(run_dir: Path, tmp_path: Path) -> None:
    from sopvit.export import load_pretrained

    run_gloo_ranks(_extract, 2, run_dir, tmp_path)
    backbone = load_pretrained(run_dir)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for limit in (1, 7):
            feats, labels = extract_dataset_features(
                backbone, "fashion_mnist", None, "test", 16, 1, 4, limit, torch.device("cpu"), "last2"
            )
            assert got[limit][0].shape == (limit, 2 * backbone.embed_dim)
            torch.testing.assert_close(got[limit][0], feats, atol=1e-5, rtol=1e-5)
            assert torch.equal(got[limit][1], labels)


@pytest.mark.slow
def test_finetune_under_torchrun_trains_one_ddp_model(run_dir: Path) -> None:
    args = ["--checkpoint", str(run_dir), "image_size=16", "limit=64", "epochs=1", "train_batch_size=8"]
    out = _eval(2, "finetune", *args, "num_workers=0")
    # each rank sees its half of the 64 training images; the test set is sharded and summed back
    assert out["finetune_train_size"] == 64 and 0 <= out["finetune_top1"] <= 100
