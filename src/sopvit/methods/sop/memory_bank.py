"""FIFO memory of past teacher embeddings, the raw material of self-organizing prototypes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sopvit.distributed import all_gather_rows


class MemoryBank(nn.Module):
    """Ring buffer of ``size`` unit-norm rows of dimension ``dim``.

    Rows start as normalised Gaussian noise (so the first prototypes are random directions, as in the
    reference). ``enqueue`` writes new keys at the pointer and wraps around the end, so any global
    batch size works. Next to each row the bank remembers the data-set index of the image it came
    from (``-1`` for the initial noise), which lets tools show the images behind a prototype.

    Under ``torch.distributed`` every rank enqueues the all-gathered keys (rank order), so all
    ranks hold identical banks.
    """

    embeddings: torch.Tensor
    sample_ids: torch.Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"MemoryBank size must be >= 1, got {size}")
        if dim < 1:
            raise ValueError(f"MemoryBank dim must be >= 1, got {dim}")
        self.size = size
        self.dim = dim
        init = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("embeddings", init)
        self.register_buffer("sample_ids", torch.full((size,), -1, dtype=torch.long))
        # The pointer lives on the host: reading it must never wait for the accelerator.
        self._pointer = 0

    @property
    def pointer(self) -> int:
        """Row that the next enqueued key will overwrite."""
        return self._pointer

    def _check_keys(self, keys: torch.Tensor, ids: torch.Tensor | None) -> None:
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"MemoryBank.enqueue: keys must be a tensor, got {type(keys).__name__}")
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(
                f"MemoryBank.enqueue: keys must have shape (n, {self.dim}), got {tuple(keys.shape)}"
            )
        if not keys.is_floating_point():
            raise ValueError(f"MemoryBank.enqueue: keys must be floating point, got {keys.dtype}")
        if ids is not None and (ids.ndim != 1 or ids.shape[0] != keys.shape[0]):
            raise ValueError(
                f"MemoryBank.enqueue: ids must have shape ({keys.shape[0]},), got {tuple(ids.shape)}"
            )

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None, same_size: bool = False) -> None:
        """Write ``keys`` (n, dim) (and optional data-set ``ids`` (n,)) at the pointer.

        Keys are detached, L2-normalised and cast to the bank's dtype. Non-finite keys are refused
        before anything is written: one NaN row would poison every later prototype.
        ``same_size=True`` promises that all ranks enqueue the same n (skips a count exchange).
        """
        self._check_keys(keys, ids)
        keys = keys.detach()
        if ids is None:
            ids = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        keys = all_gather_rows(keys, same_size=same_size)
        ids = all_gather_rows(ids.to(device=keys.device, dtype=torch.long), same_size=same_size)
        if not bool(torch.isfinite(keys).all()):
            raise ValueError("MemoryBank.enqueue: keys contain NaN or Inf; the bank was left unchanged")
        n = keys.shape[0]
        if n == 0:
            return
        if n > self.size:
            # Only the last `size` keys would survive a sequential write; skip the rest.
            keys, ids, start = keys[-self.size :], ids[-self.size :], self._pointer + n - self.size
        else:
            start = self._pointer
        rows = (torch.arange(keys.shape[0], device=self.embeddings.device) + start) % self.size
        keys = F.normalize(keys.to(self.embeddings.dtype), dim=1).to(self.embeddings.device)
        self.embeddings.index_copy_(0, rows, keys)
        self.sample_ids.index_copy_(0, rows, ids.to(self.sample_ids.device))
        self._pointer = (self._pointer + n) % self.size

    def get_extra_state(self) -> dict[str, Any]:
        return {"pointer": self._pointer, "size": self.size, "dim": self.dim}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("size") != self.size or state.get("dim") != self.dim:
            raise ValueError(
                f"MemoryBank state is for a ({state.get('size')}, {state.get('dim')}) bank, "
                f"this bank is ({self.size}, {self.dim})"
            )
        pointer = int(state["pointer"])
        if not 0 <= pointer < self.size:
            raise ValueError(f"MemoryBank state has pointer {pointer} outside [0, {self.size})")
        self._pointer = pointer

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, pointer={self._pointer}"
