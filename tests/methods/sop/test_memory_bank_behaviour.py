"""MemoryBank: seeded initial rows, remembered data-set ids, accepted id dtypes and restorable pointers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sopvit import MemoryBank


def test_initial_rows_are_the_generators_normalised_gaussian_draws() -> None:
    bank = MemoryBank(6, 3, generator=torch.Generator().manual_seed(4))
    expected = F.normalize(torch.randn(6, 3, generator=torch.Generator().manual_seed(4)), dim=1)
    assert torch.equal(bank.embeddings, expected)
    assert torch.equal(MemoryBank(6, 3, generator=torch.Generator().manual_seed(4)).embeddings, expected)


def test_a_one_dimensional_bank_is_allowed() -> None:
    bank = MemoryBank(3, 1)
    bank.enqueue(torch.tensor([[-2.0]]))
    assert bank.embeddings[0].item() == -1.0


def test_keys_without_ids_overwrite_the_ids_with_minus_one() -> None:
    bank = MemoryBank(3, 2)
    bank.enqueue(F.normalize(torch.randn(3, 2), dim=1), ids=torch.tensor([5, 6, 7]))
    bank.enqueue(F.normalize(torch.randn(2, 2), dim=1))
    assert bank.sample_ids.tolist() == [-1, -1, 7]


def test_ids_of_any_integer_dtype_are_stored_as_long() -> None:
    bank = MemoryBank(4, 2)
    bank.enqueue(F.normalize(torch.randn(2, 2), dim=1), ids=torch.tensor([3, 9], dtype=torch.int32))
    assert bank.sample_ids.dtype == torch.long and bank.sample_ids[:2].tolist() == [3, 9]


def test_a_fresh_bank_state_loads_and_pointers_outside_the_bank_are_refused() -> None:
    fresh = MemoryBank(4, 2)
    other = MemoryBank(4, 2)
    other.load_state_dict(fresh.state_dict())
    assert other.pointer == 0
    other.set_extra_state({"pointer": 3, "size": 4, "dim": 2})
    assert other.pointer == 3
    for pointer in (4, -1):
        with pytest.raises(ValueError, match="outside"):
            other.set_extra_state({"pointer": pointer, "size": 4, "dim": 2})


@pytest.mark.parametrize("same_size", [False, True])
def test_same_size_is_handed_to_the_gather_of_keys_and_ids(
    monkeypatch: pytest.MonkeyPatch, same_size: bool
) -> None:
    """``same_size=True`` skips the count exchange of both gathers (keys and ids); the default keeps it."""
    import sopvit.methods.sop.memory_bank as memory_bank_module

    seen: list[bool] = []

    def gather(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
        seen.append(same_size)
        return x

    monkeypatch.setattr(memory_bank_module, "all_gather_rows", gather)
    bank = MemoryBank(4, 2)
    bank.enqueue(torch.ones(2, 2), ids=torch.tensor([5, 6]), same_size=same_size)
    assert seen == [same_size, same_size]
    assert bank.sample_ids.tolist() == [5, 6, -1, -1]
