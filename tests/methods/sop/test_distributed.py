"""Two gloo ranks must reproduce a single process fed the concatenated batch."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sopvit import MemoryBank, SOPObjective, build_prototypes
from tests.gloo import run_gloo_ranks
from tests.methods.sop.test_objective import SMALL

STEPS, B = 12, 3  # 12 steps x 6 keys pass the 32-row patch bank and 64-row cls bank: both wrap around


def _global_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, SMALL.dim, generator=g), dim=-1)

    # Crop-major tensors of the global batch (2B images); ranks take their half of every crop.
    return {
        "student_cls": unit(4, 2 * B),
        "teacher_cls": unit(2, 2 * B),
        "student_patch": unit(2, 2 * B, 5),
        "teacher_patch": unit(2, 2 * B, 5),
        "masks": torch.rand(2, 2 * B, 5, generator=g) < 0.5,
    }


def _run(rank: int, world: int, out: Path) -> None:
    objective = SOPObjective(SMALL)
    losses, ranks_anchors = [], []
    for step in range(STEPS):
        batch = {k: v[:, rank * B : (rank + 1) * B].flatten(0, 1) for k, v in _global_batch(step).items()}
        ids = torch.arange(rank * B, (rank + 1) * B) + 100 * step
        loss, _ = objective(**batch, teacher_temp=0.04, sample_ids=ids)
        losses.append(loss.detach())
        probe = torch.Generator()
        probe.set_state(objective.generator.get_state())
        ranks_anchors.append(
            build_prototypes(objective.cls_bank.embeddings, 8, 2, 0.1, 0.5, probe).anchor_index
        )
    bank = MemoryBank(7, 2, generator=torch.Generator().manual_seed(0))
    keys = torch.full((2 + rank, 2), float(rank + 1))  # unequal row counts per rank
    bank.enqueue(keys, ids=torch.arange(2 + rank) + 10 * rank)
    torch.save(
        {
            "state": objective.state_dict(),
            "losses": torch.stack(losses),
            "anchors": ranks_anchors,
            "small_bank": bank.state_dict(),
        },
        out / f"rank{rank}.pt",
    )


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    run_gloo_ranks(_run, 2, 2, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))

    single = SOPObjective(SMALL)
    single_losses = []
    for step in range(STEPS):
        batch = {k: v.flatten(0, 1) for k, v in _global_batch(step).items()}
        loss, _ = single(**batch, teacher_temp=0.04, sample_ids=torch.arange(2 * B) + 100 * step)
        single_losses.append(loss)
    expected = single.state_dict()

    for r in (r0, r1):
        for key in (
            "cls_bank.embeddings",
            "patch_bank.embeddings",
            "cls_bank.sample_ids",
            "patch_bank.sample_ids",
        ):
            assert torch.equal(r["state"][key], expected[key]), key
        assert r["state"]["cls_bank._extra_state"]["pointer"] == single.cls_bank.pointer
    assert all(torch.equal(a, b) for a, b in zip(r0["anchors"], r1["anchors"]))
    # Each rank averages over its half; the mean of the two halves is the global mean.
    torch.testing.assert_close(
        (r0["losses"] + r1["losses"]) / 2, torch.stack(single_losses), rtol=1e-5, atol=1e-6
    )

    small = MemoryBank(7, 2, generator=torch.Generator().manual_seed(0))
    small.enqueue(
        torch.cat([torch.full((2, 2), 1.0), torch.full((3, 2), 2.0)]), ids=torch.tensor([0, 1, 10, 11, 12])
    )
    for r in (r0, r1):
        assert torch.equal(r["small_bank"]["embeddings"], small.embeddings)
        assert torch.equal(r["small_bank"]["sample_ids"], small.sample_ids)
