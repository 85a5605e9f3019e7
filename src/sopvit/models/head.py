"""Projection head shared by the [CLS] and patch tokens (SOP), optionally ending in DINO/iBOT prototypes."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class ProjectionHead(nn.Module):
    """MLP ``D -> hidden -> ... -> bottleneck`` with GELU, no BatchNorm, L2-normalised output.

    SOP compares embeddings with non-parametric prototypes (memory-bank entries) by cosine similarity, so
    by default the head ends at the normalised bottleneck. BatchNorm is left out so the head can run on
    any leading shape (tokens of every image at once) and in eval mode.

    With ``n_prototypes`` set (the DINO / iBOT baselines) a learnable prototype layer follows the
    normalised bottleneck: ``last_layer``, a weight-normalised ``Linear(bottleneck, n_prototypes,
    bias=False)`` (``torch.nn.utils.parametrizations.weight_norm``, per-prototype magnitude initialised to
    1), and the head returns its logits. As in the reference DINOHead, ``last_layer`` is created after the
    MLP's truncated-normal initialisation and keeps ``nn.Linear``'s default initialisation for its
    direction. Its parameters are ``last_layer.parametrizations.weight.original0`` (magnitude g, shape
    (n_prototypes, 1)) and ``...original1`` (direction v); the reference's old-API names are
    ``last_layer.weight_g`` / ``last_layer.weight_v``.

    Args:
        in_dim: backbone width D.
        hidden_dim: width of the hidden layers.
        bottleneck_dim: bottleneck width K (the output width unless ``n_prototypes`` is set).
        n_layers: number of Linear layers (>= 1); 1 means a single ``Linear(D, K)``.
        eps: floor of the norm in the L2 normalisation (protects all-zero rows; applied in float32).
        n_prototypes: if set, width of the weight-normalised prototype layer; ``out_dim`` is then
            ``n_prototypes`` and the output is logits instead of unit vectors.
        norm_last_layer: with ``n_prototypes``, keep the prototype magnitudes fixed at 1
            (``requires_grad`` False on ``original0``), i.e. prototypes are unit vectors; False lets them
            be learnt. DINO / iBOT's ``--norm_last_layer``. Ignored without ``n_prototypes``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        eps: float = 1e-12,
        *,
        n_prototypes: int | None = None,
        norm_last_layer: bool = True,
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
        if n_prototypes is not None and (
            isinstance(n_prototypes, bool) or not isinstance(n_prototypes, int) or n_prototypes <= 0
        ):
            raise ValueError(f"n_prototypes must be None or a positive int, got {n_prototypes!r}")
        if not isinstance(norm_last_layer, bool):
            raise ValueError(f"norm_last_layer must be a bool, got {norm_last_layer!r}")
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
        # Built after the MLP's initialisation, as in the reference: the prototypes keep nn.Linear's
        # default (Kaiming-uniform) direction, only their magnitude is set. With n_prototypes None nothing
        # is registered (no module, no state_dict key, no random draw): the SOP head is unchanged.
        self.last_layer: nn.Module | None = None
        if n_prototypes is not None:
            layer = weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False), name="weight", dim=0)
            magnitude = layer.parametrizations.weight.original0
            with torch.no_grad():
                magnitude.fill_(1.0)
            magnitude.requires_grad_(not norm_last_layer)
            self.last_layer = layer
            self.out_dim = n_prototypes

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Project and normalise (then, with prototypes, score against them).

        Args:
            x: features, (..., D).

        Returns:
            without ``n_prototypes``: float32 unit vectors, (..., K = bottleneck_dim). Normalisation happens
            in float32 so bf16 autocast does not degrade the cosine similarities computed downstream.
            With ``n_prototypes``: float32 logits, (..., n_prototypes); the prototype layer runs in float32
            with autocast disabled, since the logits are divided by temperatures down to 0.04 before the
            softmax.
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have last dim {self.in_dim}, got shape {tuple(x.shape)}")
        z = F.normalize(self.mlp(x).float(), dim=-1, eps=self.eps)
        if self.last_layer is None:
            return z
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.last_layer(z).float()
