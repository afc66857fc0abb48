"""archive/records.py ``prefetched``: records handed from the reading thread
in batches (issue 36), in order, errors in their place, and never held back
from a consumer that is waiting."""
from __future__ import annotations

import contextlib
import threading

import pytest

from cloneaware.archive import records
from cloneaware.archive.records import prefetched


@contextlib.contextmanager
def batch_sizes():
    """The size of each batch handed over while the block runs."""
    sizes: list[int] = []
    orig = records.queue.Queue.put

    def counting_put(self, item, *a, **kw):
        if isinstance(item, list):
            sizes.append(len(item))
        return orig(self, item, *a, **kw)

    records.queue.Queue.put = counting_put
    try:
        yield sizes
    finally:
        records.queue.Queue.put = orig


def test_order_and_batches():
    with batch_sizes() as handed:
        got = list(prefetched(iter(range(100_000)), 4))
    assert got == list(range(100_000))
    # far fewer handovers than items: the reading thread outruns the consumer
    # only sometimes here, but batches of more than one must have been made
    assert sum(handed) == 100_000 and len(handed) < 100_000 and max(handed) > 1


def test_an_error_comes_out_in_its_place():
    def items():
        yield from range(10)
        raise ValueError("damaged at 10")

    out = []
    with pytest.raises(ValueError, match="damaged at 10"):
        for x in prefetched(items(), 2):
            out.append(x)
    assert out == list(range(10))


def test_a_waiting_consumer_gets_each_item_of_a_slow_source():
    """The source gives one item, then waits until the consumer has it (a
    pipe that delivers the next record only after the restore answered):
    holding the item back for a batch to fill would never end."""
    got_first = threading.Event()

    def source():
        yield "first"
        assert got_first.wait(10), "the consumer never got the first item"
        yield "second"

    it = prefetched(source(), 4)
    assert next(it) == "first"
    got_first.set()
    assert next(it) == "second"
    assert list(it) == []


def test_cut_items_are_not_held_back():
    """An item ``cut`` names (a DATA payload in a reused buffer) ends its
    batch, so its buffer is not held behind the items after it."""
    seen_cut = threading.Event()

    def source():
        yield "big"
        assert seen_cut.wait(10), "the cut item was held back"
        yield "small"

    it = prefetched(source(), 4, cut=lambda x: x == "big")
    assert next(it) == "big"
    seen_cut.set()
    assert list(it) == ["small"]


def test_weight_ends_a_batch():
    with batch_sizes() as sizes:
        got = list(prefetched(iter([b"x" * (256 << 10)] * 64), 64, weigh=len))
    assert len(got) == 64
    assert max(sizes) <= records.BATCH_BYTES // (256 << 10)
