import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sopvit import build_prototypes
from sopvit.methods.sop import build_prototype_tasks
from tests.methods.sop.reference import reference_contributions, reference_supports


def _memory(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1
    )


def _anchors_drawn(n: int, a: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:a].tolist()


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_matches_loop_reference(k: int, keep: float) -> None:
    memory = _memory(40, 8)
    protos = build_prototypes(memory, 6, k, 0.1, keep, torch.Generator().manual_seed(3))
    anchors = _anchors_drawn(40, 6, 3)
    ref = reference_supports(memory, anchors, k)
    p = protos.num_prototypes
    assert p == round(keep * 6)
    assert protos.supports.shape == (p * (k + 1), 8)
    assert protos.contributions.shape == (p * (k + 1), p)
    weights, owner = [], []
    for c, anchor_row in enumerate(protos.anchor_index.tolist()):
        assert anchor_row in anchors
        neighbours, scores = ref[anchors.index(anchor_row)]
        rows = protos.support_index[c * (k + 1) : (c + 1) * (k + 1)].tolist()
        assert rows == [*neighbours, anchor_row]  # neighbours (most similar first), then the anchor
        assert all(r not in anchors for r in rows[:-1])  # anchors never serve as neighbours
        weights += [*scores, 0.9]
        owner += [c] * (k + 1)
    assert protos.owner.tolist() == owner
    torch.testing.assert_close(protos.supports, memory[protos.support_index])
    expected_y = reference_contributions(weights, owner, p)
    torch.testing.assert_close(
        protos.contributions, expected_y.to(protos.contributions.dtype), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(protos.contributions.sum(1), torch.ones(p * (k + 1)), atol=1e-6, rtol=0)


def test_same_generator_state_gives_same_anchors() -> None:
    memory = _memory(100, 4)
    a = build_prototypes(memory, 10, 2, 0.1, 0.5, torch.Generator().manual_seed(7))
    b = build_prototypes(memory, 10, 2, 0.1, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a.anchor_index, b.anchor_index) and torch.equal(a.support_index, b.support_index)


def test_each_task_of_a_batch_is_a_correct_independent_task() -> None:
    memory = _memory(64, 8)
    batched = build_prototype_tasks(memory, 3, 8, 2, 0.1, 0.5, torch.Generator().manual_seed(1))
    # The batch draws every task's anchors first, one permutation per task.
    gen = torch.Generator().manual_seed(1)
    anchors = [torch.randperm(64, generator=gen)[:8].tolist() for _ in range(3)]
    assert len({tuple(a) for a in anchors}) == 3
    for t in range(3):
        ref = reference_supports(memory, anchors[t], 2)
        for c, anchor_row in enumerate(batched.anchor_index[t].tolist()):
            neighbours, _ = ref[anchors[t].index(anchor_row)]
            assert batched.support_index[t, c * 3 : (c + 1) * 3].tolist() == [*neighbours, anchor_row]
    assert batched.supports.shape == (3, 4 * 3, 8)


def test_low_cv_keeps_the_most_homogeneous_neighbourhoods() -> None:
    memory = _memory(200, 6)
    protos = build_prototypes(
        memory, 20, 4, 0.1, 0.25, torch.Generator().manual_seed(0), anchor_selection="low_cv"
    )
    anchors = _anchors_drawn(200, 20, 0)
    ref = reference_supports(memory, anchors, 4)
    cv = {
        a: torch.tensor(s).std().item() / abs(torch.tensor(s).mean().item())
        for a, (_, s) in zip(anchors, ref)
    }
    expected = sorted(cv, key=cv.get)[:5]
    assert sorted(protos.anchor_index.tolist()) == sorted(expected)


def test_duplicate_rows_are_valid_neighbours() -> None:
    base = _memory(10, 4)
    memory = torch.cat([base, base])  # every row has an exact twin
    protos = build_prototypes(memory, 4, 1, 0.1, 1.0, torch.Generator().manual_seed(2))
    scores = protos.weights.view(4, 2)[:, 0]
    # A twin that is not itself an anchor is the nearest neighbour, with similarity 1.
    for c, a in enumerate(protos.anchor_index.tolist()):
        twin = (a + 10) % 20
        if twin not in protos.anchor_index.tolist():
            assert protos.support_index[2 * c].item() == twin
            assert scores[c].item() == pytest.approx(1.0)
    torch.testing.assert_close(protos.contributions.sum(1), torch.ones(8, dtype=torch.float32))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(4, 60),
    d=st.integers(1, 6),
    data=st.data(),
)
def test_shapes_property(n: int, d: int, data: st.DataObject) -> None:
    a = data.draw(st.integers(2, n))
    k = data.draw(st.integers(0, n - a))
    keep = data.draw(st.sampled_from([0.5, 1.0]))
    if round(keep * a) < 2:
        keep = 1.0
    protos = build_prototypes(_memory(n, d), a, k, 0.1, keep, torch.Generator().manual_seed(0))
    p = round(keep * a)
    assert protos.supports.shape == (p * (k + 1), d)
    assert protos.contributions.shape == (p * (k + 1), p)
    assert protos.owner.min() >= 0 and protos.owner.max() < p
    assert len(set(protos.anchor_index.tolist())) == p
    torch.testing.assert_close(protos.contributions.sum(1), torch.ones(p * (k + 1)), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_anchors": 0}, "n_anchors"),
        ({"n_anchors": 11}, "n_anchors"),
        ({"k": 9}, "k must be"),
        ({"k": -1}, "k must be"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"keep_fraction": 0.0}, "keep_fraction"),
        ({"keep_fraction": 0.1}, "at least 2"),
        ({"anchor_selection": "bogus"}, "anchor_selection"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    args = {"n_anchors": 4, "k": 2, "smoothing": 0.1, "keep_fraction": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        build_prototypes(_memory(10, 3), generator=torch.Generator(), **args)


def test_memory_must_be_a_matrix() -> None:
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        build_prototypes(torch.randn(4, 4, 4), 2, 0, 0.1, 1.0, torch.Generator())


def test_low_cv_needs_two_neighbours() -> None:
    with pytest.raises(ValueError, match="k >= 2"):
        build_prototypes(_memory(20, 3), 4, 1, 0.1, 0.5, torch.Generator(), anchor_selection="low_cv")


def test_low_cv_without_neighbours_is_allowed_when_every_anchor_is_kept() -> None:
    # The patch memory's defaults (k=0, keep 1) under low_cv: nothing to select, so nothing to measure.
    protos = build_prototypes(_memory(20, 3), 4, 0, 0.1, 1.0, torch.Generator(), anchor_selection="low_cv")
    assert protos.num_prototypes == 4


def test_low_cv_config_names_the_bank_whose_k_is_too_small() -> None:
    from sopvit.config import ConfigError, load_config
    from sopvit.recipe.config import pretrain_config_type

    base = ["data.dataset=fashion_mnist", "sop.anchor_selection=low_cv"]
    load_config(pretrain_config_type(), None, base)  # patch_k=0 with keep 1: fine
    with pytest.raises(ConfigError, match=r"sop\.patch_k"):
        load_config(pretrain_config_type(), None, [*base, "sop.patch_keep_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"sop\.cls_k"):
        load_config(pretrain_config_type(), None, [*base, "sop.cls_k=1"])
