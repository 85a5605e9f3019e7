"""Assignments and SOP losses pinned to their formulas on small hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sopvit import assign, build_prototypes, cross_view_loss
from sopvit.methods.sop.losses import masked_token_loss
from tests.methods.sop.reference import reference_assign


def _probs(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).softmax(-1)


def test_assign_casts_the_memory_to_the_embeddings_dtype() -> None:
    memory = F.normalize(torch.randn(30, 5, generator=torch.Generator().manual_seed(0)), dim=1)  # float32
    protos = build_prototypes(memory, 6, 2, 0.1, 1.0, torch.Generator().manual_seed(1))
    z = F.normalize(torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64), dim=1)
    p = assign(z, protos, 0.1)
    expected = reference_assign(z, protos.supports.double(), protos.contributions.double(), 0.1)
    torch.testing.assert_close(p.double(), expected, atol=1e-5, rtol=1e-5)


def test_cross_view_loss_is_float32_whatever_the_input_dtype() -> None:
    student = [_probs(3, 4, seed=i) for i in range(3)]
    teacher = [_probs(3, 4, seed=10 + j) for j in range(2)]
    assert cross_view_loss(student, teacher).dtype == torch.float32


@pytest.mark.parametrize(("bad", "name"), [("student", "student crop 1"), ("teacher", "teacher crop 1")])
def test_cross_view_loss_names_the_crop_of_the_wrong_shape(bad: str, name: str) -> None:
    good, wrong = _probs(2, 3, seed=0), _probs(2, 4, seed=1)
    student = [good, wrong] if bad == "student" else [good, good]
    teacher = [good, wrong] if bad == "teacher" else [good, good]
    with pytest.raises(ValueError, match=name):
        cross_view_loss(student, teacher)


def test_masked_token_loss_by_hand() -> None:
    """Image 0 has one masked token, image 1 two, image 2 none: mean over the 3 images of the per-image
    mean cross-entropy (0 for the image without a masked token)."""
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    student = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.8, 0.2]])
    image = torch.tensor([0, 1, 1])
    ce = [math.log(2), -math.log(0.75), -(0.5 * math.log(0.8) + 0.5 * math.log(0.2))]
    expected = (ce[0] / 1 + (ce[1] + ce[2]) / 2 + 0.0) / 3
    assert masked_token_loss(student, teacher, image, 3).item() == pytest.approx(expected, rel=1e-6)


def test_masked_token_loss_of_one_image_is_its_mean_cross_entropy() -> None:
    teacher = torch.tensor([[0.0, 1.0]])
    student = torch.tensor([[0.5, 0.5]])
    loss = masked_token_loss(student, teacher, torch.tensor([0]), 1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
