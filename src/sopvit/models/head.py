"""Projection head shared by the [CLS] and patch tokens."""

from __future__ import annotations

import itertools

import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """MLP ``D -> hidden -> ... -> bottleneck`` with GELU, no BatchNorm, L2-normalised output.

    SOP compares embeddings with non-parametric prototypes (memory-bank entries) by cosine similarity, so
    the head ends at the normalised bottleneck: there is no weight-normalised prototype layer. BatchNorm is
    left out so the head can run on any leading shape (tokens of every image at once) and in eval mode.

    Args:
        in_dim: backbone width D.
        hidden_dim: width of the hidden layers.
        bottleneck_dim: output width K.
        n_layers: number of Linear layers (>= 1); 1 means a single ``Linear(D, K)``.
        eps: floor of the norm in the L2 normalisation (protects all-zero rows; applied in float32).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("n_layers", n_layers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = bottleneck_dim
        self.eps = eps
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Project and normalise.

        Args:
            x: features, (..., D).

        Returns:
            float32 unit vectors, (..., K). Normalisation happens in float32 so bf16 autocast does not
            degrade the cosine similarities computed downstream.
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have last dim {self.in_dim}, got shape {tuple(x.shape)}")
        return F.normalize(self.mlp(x).float(), dim=-1, eps=self.eps)
