"""Counter-based uniforms: SplitMix64 over a counter, pinned to a pure-Python reference (ints mod 2^64)."""

from __future__ import annotations

import pytest
import torch

from sopvit.data.counter_rng import image_keys, uniforms
from sopvit.data.seeding import mix_seed

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
STREAM = 0xD6E8FEB86659FD93


def _mix(x: int) -> int:
    """SplitMix64's finaliser on a non-negative integer < 2^64."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def _unsigned(key: int) -> int:
    return key & MASK


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _reference_uniforms(key: int, stream: int, count: int) -> list[float]:
    """SplitMix64 whose state starts at mix(key + STREAM * (stream + 1)): output k is mix(state + k * GOLDEN),
    its top 53 bits scaled to [0, 1)."""
    state = _mix((_unsigned(key) + STREAM * (stream + 1)) & MASK)
    return [(_mix((state + k * GOLDEN) & MASK) >> 11) * 2.0**-53 for k in range(1, count + 1)]


def _reference_key(seed: int, epoch: int, index: int) -> int:
    return _signed(_mix((index * GOLDEN + mix_seed(seed, epoch)) & MASK))


KEYS = [0, 1, -1, 2**62 + 12345, -(2**63), 2**63 - 1, 0x0123456789ABCDEF]


@pytest.mark.parametrize("stream", [0, 1, 7, 1000])
def test_uniforms_equal_a_pure_python_splitmix64(stream: int) -> None:
    got = uniforms(torch.tensor(KEYS, dtype=torch.int64), stream, 9)
    assert got.dtype == torch.float64 and got.shape == (len(KEYS), 9)
    expected = torch.tensor([_reference_uniforms(k, stream, 9) for k in KEYS], dtype=torch.float64)
    assert torch.equal(got, expected)


def test_image_keys_equal_a_pure_python_reference() -> None:
    indices = torch.tensor([0, 1, 2, 59_999, 2**40])
    got = image_keys(3, 7, indices)
    assert got.dtype == torch.int64 and got.shape == (5,)
    assert got.tolist() == [_reference_key(3, 7, int(i)) for i in indices]


def test_a_longer_row_extends_a_shorter_one() -> None:
    keys = image_keys(0, 0, torch.arange(50))
    long = uniforms(keys, 2, 100)
    for count in (0, 1, 5, 54):
        assert torch.equal(uniforms(keys, 2, count), long[:, :count])


def test_a_row_depends_only_on_its_own_key() -> None:
    keys = image_keys(0, 0, torch.arange(20))
    rows = uniforms(keys, 0, 16)
    alone = torch.cat([uniforms(keys[i : i + 1], 0, 16) for i in range(20)])
    assert torch.equal(rows, alone)
    assert torch.equal(uniforms(keys.flip(0), 0, 16), rows.flip(0))


def test_different_streams_and_keys_give_different_sequences() -> None:
    keys = image_keys(0, 0, torch.arange(200))
    by_stream = [uniforms(keys, stream, 8) for stream in range(5)]
    for a in range(5):
        for b in range(a + 1, 5):
            assert not (by_stream[a] == by_stream[b]).any()  # no shared value, not just a different row
    rows = {tuple(row) for row in by_stream[0].tolist()}
    assert len(rows) == 200
    # Neighbouring keys (and the bit patterns of small integers) are decorrelated.
    u = uniforms(torch.arange(10_000, dtype=torch.int64), 0, 2)
    assert abs(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1].item()) < 5 / 100
    assert abs(torch.corrcoef(u.T)[0, 1].item()) < 5 / 100


def test_values_lie_in_the_half_open_unit_interval_with_uniform_moments() -> None:
    u = uniforms(image_keys(1, 0, torch.arange(1000)), 0, 100).flatten()  # 100k values
    assert u.min() >= 0.0 and u.max() < 1.0
    n = u.numel()
    # Standard errors of the mean and variance of U(0, 1): sqrt(1/12 / n) and sqrt(1/180 / n); 6 of them.
    assert abs(u.mean().item() - 0.5) < 6 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 6 * (1 / 180 / n) ** 0.5
    # The top 53 bits: every value is a multiple of 2^-53.
    assert torch.equal(u * 2.0**53, (u * 2.0**53).floor())


def test_count_zero_gives_empty_rows() -> None:
    assert uniforms(image_keys(0, 0, torch.arange(3)), 0, 0).shape == (3, 0)
    assert uniforms(torch.zeros(0, dtype=torch.int64), 0, 4).shape == (0, 4)


@pytest.mark.parametrize(
    "keys",
    [
        torch.zeros(4, dtype=torch.int32),
        torch.zeros(4, dtype=torch.float64),
        torch.zeros(2, 2, dtype=torch.int64),
        torch.tensor(5, dtype=torch.int64),
    ],
    ids=["int32", "float64", "2d", "scalar"],
)
def test_keys_of_the_wrong_dtype_or_shape_are_rejected(keys: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="int64"):
        uniforms(keys, 0, 3)


def test_negative_stream_or_count_is_rejected() -> None:
    keys = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=">= 0"):
        uniforms(keys, -1, 3)
    with pytest.raises(ValueError, match=">= 0"):
        uniforms(keys, 0, -1)


def test_image_keys_are_deterministic_and_depend_on_seed_epoch_and_index() -> None:
    indices = torch.arange(1000)
    keys = image_keys(0, 0, indices)
    assert torch.equal(keys, image_keys(0, 0, indices.clone()))
    assert torch.equal(keys, image_keys(0, 0, indices.to(torch.int32)))  # any integer dtype
    assert len(set(keys.tolist())) == 1000  # distinct per index
    for other in (image_keys(1, 0, indices), image_keys(0, 1, indices), image_keys(0, 0, indices + 1000)):
        assert not (other == keys).any()
    # A key is a function of its own index only, not of its position in the batch.
    assert torch.equal(image_keys(0, 0, indices[[5, 3]]), keys[[5, 3]])
