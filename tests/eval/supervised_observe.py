"""What the option tables of the supervised protocols (finetune, semisup) observe of a run, and the checks
that read the same observations in both.

A run is observed through spies on what it builds: the optimizer (the lr, weight decay and, with layer
decay, lr scale of every parameter group at every step), the classifier (its weights when built and after
training, its training and test inputs), the mixer and the losses (the targets), the train transform and
the evaluations (after which step each ran, and its top-1). The accuracy alone, on 32 test images after one
epoch, would hide most options.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch
from timm.data import Mixup
from torch import Tensor, nn

from sopvit.data.fashion_mnist import load_fashion_mnist
from sopvit.eval import supervised
from sopvit.eval.finetune_model import vit_blocks
from sopvit.eval.subsets import dataset_labels
from tests.eval.test_protocol_options import Obs, Row, Scenario, spy

LIMIT = 32
AdamW = torch.optim.AdamW
CrossEntropyLoss = nn.CrossEntropyLoss

# no random content but the crop and flip: no mixing, no RandAugment, no random erasing, no drop path
NO_ERASING = (("mixup", 0.0), ("cutmix", 0.0), ("auto_augment", None), ("drop_path", 0.0))
PLAIN = (*NO_ERASING, ("reprob", 0.0))


def observe_supervised(
    protocol: ModuleType, model_name: str, model: Any, group_keys: tuple[str, ...]
) -> Callable[[Any], Obs]:
    """``observe(cfg)`` runs ``protocol.run(model, cfg)`` with ``protocol.<model_name>`` (the classifier it
    builds) spied on; each step records ``group_keys`` of every optimizer group."""
    prefix = protocol.__name__.rsplit(".", 1)[-1]
    model_cls = getattr(protocol, model_name)

    def observe(cfg: Any) -> Obs:
        steps: list[list[tuple[float, ...]]] = []
        models: list[Any] = []
        built: list[dict[str, Tensor]] = []
        inputs: list[Tensor] = []
        test_inputs: list[Tensor] = []
        hard: list[Tensor] = []
        smoothing: list[float] = []
        mixes: list[dict[str, Any]] = []
        transforms: list[Any] = []
        evals: list[tuple[tuple[Any, ...], Any]] = []
        evaluated: list[int] = []
        subsets: list[tuple[tuple[Any, ...], Any]] = []

        class Optimizer(AdamW):
            def step(self, closure: Any = None) -> Any:
                steps.append([tuple(g[k] for k in group_keys) for g in self.param_groups])
                return super().step(closure)

        class Model(model_cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                models.append(self)
                built.append({k: v.clone() for k, v in self.state_dict().items()})

            def forward(self, x: Tensor) -> Tensor:
                (inputs if self.training else test_inputs).append(x.detach().clone())
                return super().forward(x)  # type: ignore[no-any-return]

        class Mixer(Mixup):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                mixes.append({"kwargs": kwargs, "calls": []})

            def __call__(self, x: Tensor, target: Tensor) -> Any:
                before, labels = x.clone(), target.clone()
                x, soft = super().__call__(x, target)
                mixes[-1]["calls"].append((before, x.clone(), labels, soft))
                return x, soft

        class PlainLoss(CrossEntropyLoss):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                smoothing.append(self.label_smoothing)

            def forward(self, logits: Tensor, target: Tensor) -> Tensor:
                hard.append(target.clone())
                return super().forward(logits, target)

        class Transform(supervised.SupervisedTrainTransform):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                transforms.append(self)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.optim, "AdamW", Optimizer)
            mp.setattr(protocol, model_name, Model)
            mp.setattr(supervised, "Mixup", Mixer)
            mp.setattr(nn, "CrossEntropyLoss", PlainLoss)
            mp.setattr(supervised, "SupervisedTrainTransform", Transform)
            spy(mp, protocol, "evaluate", evals)
            spy(mp, supervised, "low_shot_indices", subsets)
            spied = protocol.evaluate

            def evaluate(*args: Any) -> float:
                evaluated.append(len(steps))  # after how many optimizer steps
                return float(spied(*args))

            mp.setattr(protocol, "evaluate", evaluate)
            out = protocol.run(model, cfg)
        trained = models[0]
        return {
            "out": out,
            "train_size": out[f"{prefix}_train_size"],
            "steps": steps,
            "built": built[0],
            "state": {k: v.clone() for k, v in trained.state_dict().items()},
            "inputs": inputs,
            "test_inputs": torch.cat(test_inputs),  # every evaluation's, whatever the evaluation batch
            "evaluated": evaluated,
            "top1s": [top1 for _, top1 in evals],  # every evaluation's, in order
            "targets": hard,
            "idx": subsets[0][1],
            "eval_labels": dataset_labels(evals[0][0][1].dataset),
            "drop_path": [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit_blocks(trained.backbone)],
            "_model": trained,
            "_smoothing": smoothing,
            "_mix": mixes,
            "_transform": transforms[0],
        }

    return observe


# ------------------------------------------------------------------------------------------ checks
def trained_on(split: str) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        _, labels = load_fashion_mnist(split, limit=LIMIT)
        seen = torch.cat(sc.alt(row)["targets"])  # one epoch of full batches: every image once
        assert sorted(seen.tolist()) == sorted(labels.tolist())

    return check


def evaluated_on(split: str) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["eval_labels"].tolist() == load_fashion_mnist(split, limit=LIMIT)[1].tolist()

    return check


def train_size(n: int) -> Any:
    def check(sc: Scenario, row: Row) -> None:
        assert sc.alt(row)["train_size"] == n

    return check


def subset_trained(sc: Scenario, row: Row) -> None:
    """The listed images, once each per epoch (6 images: one batch of 6)."""
    _, labels = load_fashion_mnist("train", limit=LIMIT)
    assert sc.alt(row)["idx"].tolist() == [1, 4, 9, 16, 25, 30]
    assert sorted(torch.cat(sc.alt(row)["targets"]).tolist()) == sorted(
        labels[[1, 4, 9, 16, 25, 30]].tolist()
    )


def balanced_half(sc: Scenario, row: Row) -> None:
    _, labels = load_fashion_mnist("train", limit=LIMIT)
    counts = torch.bincount(labels).tolist()
    expected = [max(1, round(n / 2)) for n in counts]
    obs = sc.alt(row)
    assert torch.bincount(labels[obs["idx"]], minlength=len(counts)).tolist() == expected
    assert obs["train_size"] == sum(expected)


def evaluated_folder(sc: Scenario, row: Row) -> None:
    obs = sc.alt(row)
    assert obs["train_size"] == 8 and obs["eval_labels"].tolist() == [0] * 4 + [1] * 4
