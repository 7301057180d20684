"""LayerPrefetcher: items in the sweep's order, the next one read in the background, reader errors surfaced."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adapt_engine.prefetch import LayerPrefetcher


def _reader(log: list):
    def read(k: int, pin: bool) -> dict[str, torch.Tensor]:
        log.append((k, threading.current_thread().name))
        return {"w": torch.full((3, 2), float(k), dtype=torch.bfloat16).t()}  # a non-contiguous view, as mmap gives

    return read


@pytest.mark.parametrize("prefetch", [True, False])
def test_items_come_in_order_at_the_dtype(prefetch):
    log: list = []
    order = [2, 0, 1]
    with LayerPrefetcher(_reader(log), order, "cpu", torch.float32, prefetch=prefetch) as pf:
        got = [pf.take(k)["w"] for k in order]
    for k, t in zip(order, got):
        assert t.dtype == torch.float32 and t.shape == (2, 3) and torch.equal(t, torch.full((2, 3), float(k)))
    assert [k for k, _ in log] == order
    threads = {name for _, name in log}
    assert threads == ({t for t in threads if t.startswith("adapt-prefetch")} if prefetch else {"MainThread"})


def test_the_next_item_is_read_while_the_current_one_is_in_use():
    log: list = []
    with LayerPrefetcher(_reader(log), [0, 1, 2], "cpu", torch.float32) as pf:
        pf.take(0)
        deadline = time.monotonic() + 10
        while len(log) < 2 and time.monotonic() < deadline:  # item 1 is read with item 0 still held
            time.sleep(0.01)
        assert [k for k, _ in log] == [0, 1]
        pf.take(1)
        pf.take(2)
    assert [k for k, _ in log] == [0, 1, 2]


def test_out_of_order_take_is_refused():
    with LayerPrefetcher(_reader([]), [0, 1], "cpu", torch.float32) as pf:
        with pytest.raises(RuntimeError, match="out of the prefetch order"):
            pf.take(1)
        pf.take(0)
        pf.take(1)
        with pytest.raises(RuntimeError, match="order done"):
            pf.take(1)


@pytest.mark.parametrize("prefetch", [True, False])
def test_an_error_in_the_reader_surfaces_at_take(prefetch):
    def read(k: int, pin: bool) -> dict[str, torch.Tensor]:
        if k == 1:
            raise OSError("shard unreadable")
        return {"w": torch.zeros(2)}

    with LayerPrefetcher(read, [0, 1, 2], "cpu", torch.float32, prefetch=prefetch) as pf:
        pf.take(0)
        with pytest.raises(OSError, match="shard unreadable"):
            pf.take(1)
    assert not [t for t in threading.enumerate() if t.name.startswith("adapt-prefetch")]


def test_leaving_early_waits_for_the_read_under_way():
    release = threading.Event()

    def read(k: int, pin: bool) -> dict[str, torch.Tensor]:
        if k == 1:
            release.wait(10)
        return {"w": torch.zeros(2)}

    with LayerPrefetcher(read, [0, 1, 2], "cpu", torch.float32) as pf:
        pf.take(0)
        release.set()
    assert not [t for t in threading.enumerate() if t.name.startswith("adapt-prefetch")]
