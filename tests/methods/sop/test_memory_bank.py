import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sopvit import MemoryBank


def test_initial_rows_are_unit_norm_and_do_not_require_grad() -> None:
    bank = MemoryBank(16, 4)
    torch.testing.assert_close(bank.embeddings.norm(dim=1), torch.ones(16))
    assert not bank.embeddings.requires_grad
    assert bank.pointer == 0
    assert (bank.sample_ids == -1).all()


def test_enqueue_writes_at_pointer_and_wraps() -> None:
    bank = MemoryBank(5, 3)
    keys = F.normalize(torch.randn(4, 3), dim=1)
    bank.enqueue(keys, ids=torch.arange(4))
    assert bank.pointer == 4
    more = F.normalize(torch.randn(3, 3), dim=1)
    bank.enqueue(more, ids=torch.arange(10, 13))
    assert bank.pointer == 2
    torch.testing.assert_close(bank.embeddings[4], more[0])
    torch.testing.assert_close(bank.embeddings[:2], more[1:])
    torch.testing.assert_close(bank.embeddings[2:4], keys[2:])
    assert bank.sample_ids.tolist() == [11, 12, 2, 3, 10]


def test_enqueue_normalises_detaches_and_casts() -> None:
    bank = MemoryBank(4, 2)
    keys = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    bank.enqueue(keys)
    assert bank.embeddings.dtype == torch.float32 and not bank.embeddings.requires_grad
    torch.testing.assert_close(bank.embeddings[0], torch.tensor([0.6, 0.8]))


def test_embeddings_are_exposed_without_a_copy() -> None:
    bank = MemoryBank(4, 2)
    view = bank.embeddings
    bank.enqueue(torch.tensor([[1.0, 0.0]]))
    assert view.data_ptr() == bank.embeddings.data_ptr()
    torch.testing.assert_close(view[0], torch.tensor([1.0, 0.0]))


@settings(max_examples=50, deadline=None)
@given(size=st.integers(1, 12), batches=st.lists(st.integers(0, 30), min_size=1, max_size=5))
def test_ring_buffer_equals_sequential_writes(size: int, batches: list[int]) -> None:
    bank = MemoryBank(size, 2)
    expected = bank.embeddings.clone()
    pointer = 0
    for i, n in enumerate(batches):
        keys = F.normalize(torch.randn(n, 2, generator=torch.Generator().manual_seed(i)), dim=1)
        for row in keys:
            expected[pointer] = row
            pointer = (pointer + 1) % size
        bank.enqueue(keys)
    assert bank.pointer == pointer
    torch.testing.assert_close(bank.embeddings, expected)


def test_state_dict_round_trip_keeps_pointer() -> None:
    bank = MemoryBank(6, 3)
    bank.enqueue(F.normalize(torch.randn(4, 3), dim=1), ids=torch.arange(4))
    state = bank.state_dict()
    assert set(state) == {"embeddings", "sample_ids", "_extra_state"}
    other = MemoryBank(6, 3)
    other.load_state_dict(state)
    assert other.pointer == 4
    assert torch.equal(other.embeddings, bank.embeddings) and torch.equal(other.sample_ids, bank.sample_ids)
    with pytest.raises(ValueError, match=r"\(6, 3\) bank"):
        MemoryBank(7, 3).load_state_dict(state)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (torch.randn(3, 4), r"shape \(n, 3\)"),
        (torch.randn(3), r"shape \(n, 3\)"),
        (torch.ones(2, 3, dtype=torch.long), "floating point"),
        (torch.tensor([[1.0, float("nan"), 0.0]]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf"), 0.0]]), "NaN or Inf"),
    ],
)
def test_bad_keys_raise_and_leave_the_bank_unchanged(keys: torch.Tensor, message: str) -> None:
    bank = MemoryBank(5, 3)
    before = bank.embeddings.clone()
    with pytest.raises(ValueError, match=message):
        bank.enqueue(keys)
    assert torch.equal(bank.embeddings, before) and bank.pointer == 0


def test_bad_sizes_and_ids_raise() -> None:
    with pytest.raises(ValueError, match="size"):
        MemoryBank(0, 3)
    with pytest.raises(ValueError, match="dim"):
        MemoryBank(3, 0)
    with pytest.raises(ValueError, match="ids"):
        MemoryBank(3, 2).enqueue(torch.randn(2, 2), ids=torch.arange(3))
    with pytest.raises(TypeError, match="tensor"):
        MemoryBank(3, 2).enqueue([[1.0, 0.0]])  # type: ignore[arg-type]
