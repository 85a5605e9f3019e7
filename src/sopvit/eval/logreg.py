"""L2-regularised multinomial logistic regression on frozen features (DINO/iBOT low-shot protocol).

Full-batch L-BFGS in torch, so it runs on the accelerator and needs no scikit-learn. The objective is
scikit-learn's: ``C * sum_i CE_i + ||W||^2 / 2`` (bias unregularised), divided by ``C * N`` so the
scale does not depend on the data-set size; a larger ``c`` means weaker regularisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sopvit.config import check
from sopvit.device import resolve_device
from sopvit.eval.cache import EvalDataConfig, check_layers, split_features
from sopvit.eval.linear import standardise
from sopvit.eval.registry import register
from sopvit.eval.subsets import check_subset, low_shot_indices, split_paths
from sopvit.models import Backbone


@dataclass
class LogRegConfig(EvalDataConfig):
    layers: str = "cls"
    c: float = 1.0  # inverse regularisation strength (scikit-learn's C)
    max_iter: int = 1000
    subset_file: str | None = None  # low-shot: indices or file names, one per line (the 1% list)
    subset_fraction: float | None = None  # low-shot: keep this fraction of each class, drawn with `seed`
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_layers(self.layers)
        check(self.c > 0, "c", "must be > 0")
        check(self.max_iter >= 1, "max_iter", "must be >= 1")
        check_subset(self.subset_file, self.subset_fraction)


def fit_logreg(x: Tensor, y: Tensor, n_classes: int, c: float, max_iter: int = 1000) -> tuple[Tensor, Tensor]:
    """(W (F, C), b (C,)) minimising mean CE + ||W||^2 / (2 C N) with full-batch L-BFGS."""
    w = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, device=x.device, requires_grad=True)
    reg = 1.0 / (2.0 * c * x.shape[0])
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + reg * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


@register("logreg", LogRegConfig, "L2 logistic regression (L-BFGS) on frozen features, optional low-shot")
def run(backbone: Backbone, cfg: LogRegConfig) -> dict[str, float]:
    cfg.validate()
    device = resolve_device(cfg.device)
    train_x, train_y = split_features(backbone, cfg, cfg.train_split, cfg.layers)
    test_x, test_y = split_features(backbone, cfg, cfg.test_split, cfg.layers)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    names = split_paths(cfg.dataset, cfg.path, cfg.train_split, cfg.limit)
    subset = low_shot_indices(train_y, cfg.subset_file, cfg.subset_fraction, cfg.seed, names)
    train_x, train_y = train_x[subset], train_y[subset]
    # statistics of the labelled subset only: the low-shot learner sees nothing else of the train split
    train_x, test_x = (t.to(device) for t in standardise(train_x, test_x))
    w, b = fit_logreg(train_x, train_y.to(device), n_classes, cfg.c, cfg.max_iter)
    correct = int(((test_x @ w + b).argmax(1) == test_y.to(device)).sum())
    top1 = 100.0 * correct / test_y.numel()
    return {"logreg_top1": top1, "logreg_train_size": float(subset.numel())}
