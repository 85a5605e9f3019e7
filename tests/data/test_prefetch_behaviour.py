"""prefetch pinned: how far its producer runs ahead and that a full queue makes it wait (never drop a
batch), the daemon thread it runs in, errors raised at their batch, stopping and closing the source on an
early close, and on a CUDA device the side-stream protocol (seen through stand-in CUDA objects)."""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import torch

from sopvit.data import prefetch as prefetch_module
from sopvit.data.prefetch import prefetch

CPU = torch.device("cpu")
WAIT_S = 10.0  # generous bound for events that must happen (never reached unless the code is broken)


@dataclass
class Item:
    i: int
    crops: list[Any] = field(default_factory=lambda: [torch.zeros(1)])
    masks: Any = field(default_factory=lambda: torch.zeros(1))


class Source:
    """An iterator of ``n`` items that records how many were pulled, can fail at item ``fail_at``, and
    records whether it was closed."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.pulled = 0
        self.closed = False
        self.changed = threading.Condition()

    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        with self.changed:
            i = self.pulled
            if i == self.fail_at:
                raise OSError(f"disk gone at {i}")
            if i >= self.n:
                raise StopIteration
            self.pulled += 1
            self.changed.notify_all()
        return Item(i)

    def wait_pulled(self, count: int, timeout: float = WAIT_S) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.pulled >= count, timeout)

    def close(self) -> None:
        self.closed = True


def _prefetched(source: Source, **depth: int) -> Generator[Item, None, None]:
    return cast(Generator[Item, None, None], prefetch(source, CPU, **depth))


_EARLIER: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _earlier_producers() -> Iterator[None]:
    """Producers left by other tests' unclosed streams (until collected) are not this test's."""
    _EARLIER.clear()
    _EARLIER.update(t for t in threading.enumerate() if t.name == "sopvit-prefetch")
    yield


def _producer() -> threading.Thread | None:
    """The producer thread this test started, if it is still running."""
    return next((t for t in threading.enumerate() if t.name == "sopvit-prefetch" and t not in _EARLIER), None)


def test_the_producer_runs_depth_batches_ahead_and_waits_while_the_queue_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The producer checks for a gone consumer every _POLL_S: short, so a waiting producer polls many times.
    monkeypatch.setattr(prefetch_module, "_POLL_S", 0.001)
    source = Source(10)
    # closing(): a failed assertion must not leave a producer polling (a non-daemon one would hang exit)
    with closing(_prefetched(source)) as stream:  # default depth 2
        assert next(stream).i == 0
        # Items 1 and 2 queued, item 3 in the producer's hand waiting for room: 4 pulled.
        assert source.wait_pulled(4)
        # Held back by the consumer: the 5th is not pulled (it could only be with more room in the queue).
        # The wait cannot fail for correct code; it gives a wrong one (more room, or a producer that gives up
        # on a full queue) far more than enough polls to show itself.
        assert not source.wait_pulled(5, timeout=0.2)
        producer = _producer()
        assert producer is not None and producer.is_alive() and producer.daemon  # waiting, not gone
        assert source.pulled == 4
        assert next(stream).i == 1
        assert source.wait_pulled(5)  # room for one more
        assert [item.i for item in stream] == list(range(2, 10))  # nothing dropped, in order
        assert source.closed and _producer() is None


def test_depth_one_is_allowed_and_keeps_one_batch_queued() -> None:
    source = Source(6)
    with closing(_prefetched(source, depth=1)) as stream:
        assert next(stream).i == 0
        assert source.wait_pulled(3)  # one queued, one in hand
        assert not source.wait_pulled(4, timeout=0.05)
        assert [item.i for item in stream] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("depth", [0, -1])
def test_a_depth_below_one_is_refused(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"depth must be >= 1, got {depth}"):
        next(prefetch(Source(3), CPU, depth=depth))


def test_an_iterator_without_close_is_served_to_its_end() -> None:
    assert [item.i for item in prefetch(iter([Item(0), Item(1), Item(2)]), CPU)] == [0, 1, 2]


def test_the_producers_error_is_raised_at_its_batch_and_the_source_closed() -> None:
    source = Source(10, fail_at=3)
    with closing(_prefetched(source, depth=2)) as stream:
        assert [next(stream).i for _ in range(3)] == [0, 1, 2]
        with pytest.raises(OSError, match="disk gone at 3"):
            next(stream)
        assert source.closed and _producer() is None
        with pytest.raises(StopIteration):
            next(stream)


def test_closing_early_stops_the_waiting_producer_and_closes_the_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prefetch_module, "_POLL_S", 0.001)
    source = Source(1000)
    stream = prefetch(source, CPU, depth=1)
    assert next(stream).i == 0
    assert source.wait_pulled(3)  # the queue is full and the producer waits with item 2
    # Closed from another thread, so that a producer that can never notice would fail the test, not hang it.
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert source.closed and source.pulled == 3 and _producer() is None


class _FakeStream:
    def __init__(self, name: str, device: Any) -> None:
        self.name, self.device = name, device
        self.waited: list[Any] = []

    def wait_event(self, event: Any) -> None:
        self.waited.append(event)


class _FakeEvent:
    def __init__(self) -> None:
        self.recorded_on: Any = "never"

    def record(self, stream: Any) -> None:
        self.recorded_on = stream


class _FakeTensor:
    def __init__(self) -> None:
        self.used_on: list[Any] = []

    def record_stream(self, stream: Any) -> None:
        self.used_on.append(stream)


def test_on_cuda_batches_are_made_on_a_side_stream_the_step_waits_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA calls are stood in for, so the protocol is checked on any machine."""
    active = threading.local()
    sides: list[_FakeStream] = []
    main = _FakeStream("main", None)
    asked_current: list[Any] = []

    def new_stream(device: Any) -> _FakeStream:
        sides.append(_FakeStream("side", device))
        return sides[-1]

    @contextmanager
    def use_stream(stream: Any) -> Iterator[None]:
        before = getattr(active, "stream", None)
        active.stream = stream
        try:
            yield
        finally:
            active.stream = before

    def current_stream(device: Any) -> _FakeStream:
        asked_current.append(device)
        return main

    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)

    made_on: list[Any] = []

    def produce() -> Iterator[Item]:
        for i in range(3):
            made_on.append(getattr(active, "stream", None))
            yield Item(i, crops=[_FakeTensor(), _FakeTensor()], masks=_FakeTensor())

    device = torch.device("cuda", 1)
    batches = list(prefetch(produce(), device))
    assert [b.i for b in batches] == [0, 1, 2]
    assert len(sides) == 1 and sides[0].device == device
    side = sides[0]
    assert made_on == [side, side, side]  # every batch made on the side stream
    # One event per batch, recorded on the side stream; the consumer's stream on the device waits for each.
    assert len(main.waited) == 3 and all(isinstance(e, _FakeEvent) for e in main.waited)
    assert all(e.recorded_on is side for e in main.waited)
    assert len({id(e) for e in main.waited}) == 3
    assert asked_current == [device] * 3
    # Every crop and the masks are marked as used on the consumer's stream.
    for b in batches:
        assert all(t.used_on == [main] for t in (*b.crops, b.masks))


def test_on_the_cpu_no_cuda_call_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a CUDA call on the CPU path")

    for name in ("Stream", "stream", "Event", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    assert [item.i for item in prefetch(Source(4), CPU)] == [0, 1, 2, 3]
