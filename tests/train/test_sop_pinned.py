"""SOP's training pinned to numbers recorded before the objective interface (iBOT/DINO issue) existed.

A tiny seeded run with drop path, augmentation, masks, accumulation and KoLeo on: its loss at every step
and checksums of the final weights and memories. Recorded at commit fbb6937 on this CPU (the objective
refactor was checked bit-exact against it), then re-recorded once at commit c000266, whose device-path
augmentation draws from per-image counter streams instead of one generator per micro-batch (other crops,
the same objective), and once for issue 20, where the micro-batches of a step share one draw of SOP's
prototypes, as ranks do (this run accumulates 2 micro-batches; with one per step nothing changed).
The tolerance only absorbs float differences between CPU instruction sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sopvit.train.trainer import Trainer
from tests.train.tiny import tiny_config

LOSSES = [5.023643493652344, 4.1568098068237305, 4.938593864440918, 4.804094314575195, 4.957810401916504]
TEACHER_SUM = 158.42999667154228
CLS_BANK_SUM = -12.328570536992629
PATCH_BANK_SUM = -10.700593150642817


def test_a_seeded_sop_run_reproduces_the_recorded_losses_weights_and_memories(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config(
            tmp_path,
            "train.max_steps=5",
            "run.log_every=1",
            "model.drop_path_rate=0.1",
            "train.accum_steps=2",
            "data.augment_on=device",
            "sop.koleo_weight=0.1",
        )
    )
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    actual = {
        "loss": torch.tensor([r["loss"] for r in rows], dtype=torch.float64),
        "teacher": sum(v.double().sum() for v in trainer.model.teacher.state_dict().values()),
        "cls_bank": trainer.objective.cls_bank.embeddings.double().sum(),
        "patch_bank": trainer.objective.patch_bank.embeddings.double().sum(),
    }
    expected = {
        "loss": torch.tensor(LOSSES, dtype=torch.float64),
        "teacher": torch.tensor(TEACHER_SUM, dtype=torch.float64),
        "cls_bank": torch.tensor(CLS_BANK_SUM, dtype=torch.float64),
        "patch_bank": torch.tensor(PATCH_BANK_SUM, dtype=torch.float64),
    }
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-5, msg=key)
