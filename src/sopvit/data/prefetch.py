"""Preparing the next batch while the current step runs: a producer thread, on CUDA a side stream.

Decoding and augmenting on the device are kernel launches driven from Python; done inline they would
wait for the step's kernels and the step for them. A thread running the batch iterator ahead, on its own
CUDA stream, lets the GPU overlap both; on the CPU, torch's ops release the GIL, so the thread's work
overlaps the step's Python. The iterator must not draw from torch's global RNG (the step does), which the
device path never does: its randomness is keyed by (seed, epoch, image).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any, Protocol, TypeVar

import torch

__all__ = ["prefetch"]

_END = object()
_POLL_S = 0.1  # how often a blocked producer checks whether the consumer has gone


class _HasCrops(Protocol):
    crops: list[torch.Tensor]
    masks: torch.Tensor


B = TypeVar("B", bound=_HasCrops)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(batches: Iterator[B], device: torch.device, depth: int = 2) -> Iterator[B]:
    """Yields ``batches`` in order, produced up to ``depth`` ahead in a background thread.

    An exception in the producer is raised here, at the batch it concerns. Closing the returned
    generator early (a run that stops) stops the producer and waits for it.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for batch in batches:
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((batch, event)):
                        return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Failed(exc))

    worker = threading.Thread(target=produce, name="sopvit-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            batch, event = item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                # The side stream's allocator must not reuse these tensors' memory while this stream reads.
                for tensor in (*batch.crops, batch.masks):
                    tensor.record_stream(current)
            yield batch
    finally:
        stop.set()
        worker.join()
        close = getattr(batches, "close", None)
        if close is not None:
            close()
