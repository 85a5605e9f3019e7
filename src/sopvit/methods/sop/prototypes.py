"""Self-organizing prototypes: anchors sampled from a memory plus their nearest support embeddings.

Shapes: N memory rows of dimension d; T independent tasks; A anchors drawn per task; P = round(f * A)
kept prototypes per task; k neighbours per anchor; S = P * (k + 1) supports per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

AnchorSelection = Literal["uniform", "low_cv"]


@dataclass(frozen=True)
class Prototypes:
    """One task's prototypes (leading task dim ``T`` when built by :func:`build_prototype_tasks`).

    supports:      (S, d)  the support embeddings D, grouped by prototype: k neighbours, then the anchor.
    contributions: (S, P)  the contribution matrix Y; every row sums to 1.
    support_index: (S,)    row of each support in the memory.
    owner:         (S,)    prototype id in [0, P) of each support.
    anchor_index:  (P,)    memory row of each kept prototype's anchor.
    weights:       (S,)    contribution of each support to its own prototype (w_r).
    """

    supports: torch.Tensor
    contributions: torch.Tensor
    support_index: torch.Tensor
    owner: torch.Tensor
    anchor_index: torch.Tensor
    weights: torch.Tensor

    @property
    def num_prototypes(self) -> int:
        return int(self.contributions.shape[-1])


def _validate(memory: torch.Tensor, n_anchors: int, k: int, smoothing: float, keep_fraction: float) -> int:
    if memory.ndim != 2:
        raise ValueError(f"memory must have shape (N, d), got {tuple(memory.shape)}")
    n = memory.shape[0]
    if not 1 <= n_anchors <= n:
        raise ValueError(f"n_anchors must be in [1, memory size {n}], got {n_anchors}")
    if k < 0 or k > n - n_anchors:
        raise ValueError(
            f"k must be in [0, memory size - n_anchors = {n - n_anchors}] (anchors are excluded from "
            f"the neighbour pool), got {k}"
        )
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    kept = round(keep_fraction * n_anchors)
    if kept < 2:
        raise ValueError(
            f"keep_fraction * n_anchors = {keep_fraction} * {n_anchors} keeps {kept} prototype(s); "
            "at least 2 are needed to spread the contributions"
        )
    return kept


def _select(
    scores: torch.Tensor, kept: int, rule: AnchorSelection, generator: torch.Generator
) -> torch.Tensor:
    """Indices (T, kept) of the anchors to keep, from neighbour scores (T, A, k)."""
    t, a, k = scores.shape
    if rule == "uniform":
        # The reference's "low_energy" branch reduces to this random subset (see METHOD.md).
        draws = [torch.randperm(a, generator=generator, device=generator.device)[:kept] for _ in range(t)]
        return torch.stack(draws).to(scores.device)
    if rule == "low_cv":
        # Intended rule: prefer anchors whose neighbours are equally close (small coefficient of
        # variation of the scores), i.e. homogeneous neighbourhoods.
        if k < 2 and kept == a:  # every anchor is kept: there is nothing to choose, so no spread is needed
            return torch.arange(a, device=scores.device).expand(t, a)
        if k < 2:
            raise ValueError(
                f"anchor_selection='low_cv' needs k >= 2 neighbours to measure spread, got k={k}"
            )
        cv = scores.std(dim=-1) / scores.mean(dim=-1).abs().clamp_min(1e-6)
        return cv.topk(kept, dim=-1, largest=False).indices
    raise ValueError(f"anchor_selection must be 'uniform' or 'low_cv', got {rule!r}")


@torch.no_grad()
def build_prototype_tasks(
    memory: torch.Tensor,
    n_tasks: int,
    n_anchors: int,
    k: int,
    smoothing: float,
    keep_fraction: float,
    generator: torch.Generator,
    anchor_selection: AnchorSelection = "uniform",
) -> Prototypes:
    """Build ``n_tasks`` independent sets of prototypes from ``memory`` (N, d) in one batch of matmuls.

    Every field gets a leading task dim T. Random draws come only from ``generator``; give every rank
    a generator in the same state and every rank draws the same anchors.
    """
    kept = _validate(memory, n_anchors, k, smoothing, keep_fraction)
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    n, device = memory.shape[0], memory.device
    # A prefix of a uniform permutation = anchors drawn without replacement; the rest is the pool.
    anchors = torch.stack(
        [torch.randperm(n, generator=generator, device=generator.device)[:n_anchors] for _ in range(n_tasks)]
    ).to(device)  # (T, A)

    if k > 0:
        # Under autocast this search runs in bf16 (2-3x faster on GPUs and AMX CPUs); the scores are
        # only compared and used as contribution weights, where bf16's 3 digits suffice.
        sims = torch.einsum("tad,nd->tan", memory[anchors], memory)  # (T, A, N)
        # Exclude the task's anchors from its pool without copying the memory.
        excluded = anchors[:, None, :].expand(n_tasks, n_anchors, n_anchors)
        sims.scatter_(2, excluded, float("-inf"))
        scores, neighbours = sims.topk(k, dim=-1)  # (T, A, k)
        scores = scores.float()
    else:
        scores = memory.new_zeros((n_tasks, n_anchors, 0), dtype=torch.float32)
        neighbours = anchors.new_zeros((n_tasks, n_anchors, 0))
    keep = _select(scores, kept, anchor_selection, generator)  # (T, P)

    anchor_index = anchors.gather(1, keep)  # (T, P)
    pick = keep[..., None].expand(-1, -1, k)
    support_index = torch.cat([neighbours.gather(1, pick), anchor_index[..., None]], dim=2)  # (T, P, k+1)
    anchor_weight = torch.full_like(anchor_index, 1.0 - smoothing, dtype=torch.float32)[..., None]
    weights = torch.cat([scores.gather(1, pick), anchor_weight], dim=2).flatten(1)  # (T, S)

    s = kept * (k + 1)
    owner = torch.arange(kept, device=device).repeat_interleave(k + 1)  # (S,)
    # Y[r, c(r)] = w_r, Y[r, j] = (1 - w_r) / (P - 1) elsewhere.
    y = ((1.0 - weights) / (kept - 1))[..., None].expand(n_tasks, s, kept).clone()
    y.scatter_(2, owner.expand(n_tasks, s)[..., None], weights[..., None])
    y = y / y.sum(dim=-1, keepdim=True)  # rounding only

    support_index = support_index.flatten(1)  # (T, S)
    return Prototypes(
        supports=memory[support_index],
        contributions=y,
        support_index=support_index,
        owner=owner.expand(n_tasks, s),
        anchor_index=anchor_index,
        weights=weights,
    )


def build_prototypes(
    memory: torch.Tensor,
    n_anchors: int,
    k: int,
    smoothing: float,
    keep_fraction: float,
    generator: torch.Generator,
    anchor_selection: AnchorSelection = "uniform",
) -> Prototypes:
    """One task of SOP prototypes from ``memory`` (N, d); see METHOD.md, "Building prototypes".

    1. a uniform random permutation of the rows: the first ``n_anchors`` are anchors, the rest the pool;
    2. each anchor's ``k`` most similar pool rows (dot product) are its neighbours, with scores s;
    3. keep ``round(keep_fraction * n_anchors)`` = P anchors (uniformly, or lowest score CV for ``low_cv``);
    4. supports: each kept prototype's neighbours then its anchor, S = P * (k + 1) rows;
    5. Y[r, c(r)] = w_r (s for a neighbour, 1 - smoothing for the anchor), (1 - w_r) / (P - 1) elsewhere.
    """
    tasks = build_prototype_tasks(
        memory, 1, n_anchors, k, smoothing, keep_fraction, generator, anchor_selection
    )
    return Prototypes(
        supports=tasks.supports[0],
        contributions=tasks.contributions[0],
        support_index=tasks.support_index[0],
        owner=tasks.owner[0],
        anchor_index=tasks.anchor_index[0],
        weights=tasks.weights[0],
    )
