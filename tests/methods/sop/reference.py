"""Straightforward loop implementations of METHOD.md, the yardstick for the vectorised code."""

from __future__ import annotations

import math

import torch


def reference_supports(
    memory: torch.Tensor, anchor_rows: list[int], k: int
) -> list[tuple[list[int], list[float]]]:
    """For each anchor: its k most similar non-anchor rows (by dot product) and their scores."""
    out = []
    for a in anchor_rows:
        scored = [(float(memory[a] @ memory[j]), j) for j in range(memory.shape[0]) if j not in anchor_rows]
        scored.sort(key=lambda t: -t[0])
        out.append(([j for _, j in scored[:k]], [s for s, _ in scored[:k]]))
    return out


def reference_contributions(weights: list[float], owner: list[int], n_protos: int) -> torch.Tensor:
    y = torch.zeros(len(weights), n_protos, dtype=torch.float64)
    for r, (w, c) in enumerate(zip(weights, owner)):
        for j in range(n_protos):
            y[r, j] = w if j == c else (1 - w) / (n_protos - 1)
    return y


def reference_assign(z: torch.Tensor, supports: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    out = torch.zeros(z.shape[0], y.shape[1], dtype=torch.float64)
    for n in range(z.shape[0]):
        logits = [float(z[n] @ supports[s]) / tau for s in range(supports.shape[0])]
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        soft = [v / sum(e) for v in e]
        for j in range(y.shape[1]):
            out[n, j] = sum(soft[s] * float(y[s, j]) for s in range(supports.shape[0]))
    return out


def reference_cross_view(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> float:
    total, pairs = 0.0, 0
    for i, p in enumerate(student):
        for j, q in enumerate(teacher):
            if i == j:
                continue
            pairs += 1
            for b in range(p.shape[0]):
                total += (
                    -sum(float(q[b, c]) * math.log(float(p[b, c])) for c in range(p.shape[1])) / p.shape[0]
                )
    return total / pairs


def reference_masked(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> float:
    per_image = []
    for b in range(student.shape[0]):
        ces = [
            -sum(float(teacher[b, t, c]) * math.log(float(student[b, t, c])) for c in range(student.shape[2]))
            for t in range(student.shape[1])
            if mask[b, t]
        ]
        per_image.append(sum(ces) / len(ces) if ces else 0.0)
    return sum(per_image) / len(per_image)
