import math
from pathlib import Path

import pytest
import torch

from sopvit.eval.logreg import LogRegConfig, fit_logreg, run
from sopvit.eval.subsets import fraction_subset, read_subset_file
from sopvit.models import create_backbone


def test_separable_features() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.eye(4)[y] * 3 + 0.3 * torch.randn(200, 4, generator=gen)
    w, b = fit_logreg(x[:150], y[:150], 4, c=1.0)
    assert float(((x[150:] @ w + b).argmax(1) == y[150:]).float().mean()) == 1.0
    # stronger regularisation shrinks the weights
    w_small, _ = fit_logreg(x[:150], y[:150], 4, c=1e-3)
    assert float(w_small.norm()) < float(w.norm())


def test_fraction_subset_is_balanced_and_seeded() -> None:
    labels = torch.arange(1000) % 10
    idx = fraction_subset(labels, 0.1, seed=0)
    assert idx.numel() == 100 and torch.bincount(labels[idx]).tolist() == [10] * 10
    assert torch.equal(idx, fraction_subset(labels, 0.1, seed=0))
    assert not torch.equal(idx, fraction_subset(labels, 0.1, seed=1))
    assert fraction_subset(labels, 0.001, seed=0).numel() == 10  # at least one per class


def test_subset_file(tmp_path: Path) -> None:
    f = tmp_path / "1percent.txt"
    f.write_text("3\n1\n\n3\n")
    assert read_subset_file(str(f), 5).tolist() == [1, 3]
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        read_subset_file(str(f), 3)
    f.write_text("1\nabc\n")
    with pytest.raises(ValueError, match="integer"):
        read_subset_file(str(f), 5)
    with pytest.raises(FileNotFoundError, match="subset_file"):
        read_subset_file(str(tmp_path / "missing.txt"), 5)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="subset_file"):
        LogRegConfig(subset_file="a", subset_fraction=0.1).validate()
    with pytest.raises(ValueError, match="c"):
        LogRegConfig(c=0.0).validate()


def test_run_on_fashion_mnist(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_test", img_size=28, in_chans=1)
    common = {"limit": 300, "device": "cpu", "cache_dir": str(tmp_path), "max_iter": 100}
    full = run(backbone, LogRegConfig(**common))  # type: ignore[arg-type]
    assert full["logreg_train_size"] == 300
    subset = tmp_path / "idx.txt"
    subset.write_text("\n".join(str(i) for i in range(0, 300, 10)))
    low = run(backbone, LogRegConfig(subset_file=str(subset), **common))  # type: ignore[arg-type]
    assert low["logreg_train_size"] == 30
    frac = run(backbone, LogRegConfig(subset_fraction=0.1, **common))  # type: ignore[arg-type]
    assert 10 <= frac["logreg_train_size"] <= 40
    for out in (full, low, frac):
        assert math.isfinite(out["logreg_top1"]) and 0 <= out["logreg_top1"] <= 100
