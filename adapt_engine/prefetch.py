"""Reading the next streamed layer (or vocabulary chunk) while the current one computes, on any device.

A streamed pass visits the decoder layers in an order known in advance (forward sweep 0..L-1, backward sweep
L-1..0, cut sweep over the layers that lose something). :class:`LayerPrefetcher` hands out the weights of one
item at a time in that order and, while the caller uses item k, reads item k+1 in a background thread:

- on the CPU the thread reads the item's tensors from the shards into host buffers (the disk reads overlap the
  computation);
- on a CUDA device it reads them into page-locked (pinned) host buffers, then copies them host → device with
  ``non_blocking=True`` on a dedicated stream, and records an event that the compute stream waits on before
  it uses them.

So at most two items are resident: the one in use and the next. The caller releases an item before taking
the one after it. The CUDA-specific part is :class:`_CudaTransfer` (pinning, the side stream, the event); the
CPU's :class:`_HostTransfer` is the same interface doing nothing, so everything else runs the same code here.
An exception raised while reading in the background is raised again by :meth:`LayerPrefetcher.take`.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence

import torch

Tensors = dict[str, torch.Tensor]


class _HostTransfer:
    """The CPU: host tensors are used where they are (no pinning, no streams)."""

    pin = False

    def to_device(self, host: Tensors) -> tuple[Tensors, object]:
        """``host`` itself, and no event."""
        return host, None

    def ready(self, tensors: Tensors, event: object) -> None:
        """Nothing to wait for."""


class _CudaTransfer:
    """Host → device copies on a side stream; the compute stream waits on their event."""

    pin = True

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_device(self, host: Tensors) -> tuple[Tensors, object]:
        """Copy pinned ``host`` tensors to the device on the side stream; returns them and the copies' event."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = {name: t.to(self.device, non_blocking=True) for name, t in host.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        event.synchronize()  # this thread waits, not the compute stream: the pinned buffers may then be freed
        return out, event

    def ready(self, tensors: Tensors, event: object) -> None:
        """Make the compute stream wait for the copies, and keep their memory from the side stream's reuse."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in tensors.values():
            t.record_stream(compute)  # allocated on the side stream, freed after use on this one


def host_copy(t: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """``t`` in its own host buffer at ``dtype``, pinned if asked."""
    out = torch.empty(t.shape, dtype=dtype, pin_memory=pin)
    out.copy_(t)
    return out


class LayerPrefetcher:
    """Hands out ``read(k, pin)`` at ``dtype`` for every k of ``order``, in that order, on ``device``; with
    ``prefetch`` the next item is read (and copied to the device) in a background thread while the current one
    is in use.

    ``read(k, pin)`` returns host tensors in buffers of their own (pinned when ``pin``), in any floating dtype
    (those not at ``dtype`` are converted here). Use as a context manager; :meth:`take` each item of ``order``
    in turn.
    """

    def __init__(self, read: Callable[[int, bool], Tensors], order: Sequence[int], device: torch.device | str,
                 dtype: torch.dtype, prefetch: bool = True):
        self.read = read
        self.order = list(order)
        self.device = torch.device(device)
        self.dtype = dtype
        self.transfer = _CudaTransfer(self.device) if self.device.type == "cuda" else _HostTransfer()
        self._position = 0  # index in ``order`` of the next item to take
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapt-prefetch")
                      if prefetch else None)
        self._pending: concurrent.futures.Future | None = None

    def _fetch(self, index: int) -> tuple[Tensors, object]:
        """Item ``index`` read into its own (pinned on CUDA) host buffers and moved to the device."""
        pin = self.transfer.pin
        host = {name: t if t.dtype == self.dtype else host_copy(t, self.dtype, pin)
                for name, t in self.read(index, pin).items()}
        return self.transfer.to_device(host)

    def __enter__(self) -> LayerPrefetcher:
        self._submit()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self) -> None:
        if self._pool is not None and self._position < len(self.order):
            self._pending = self._pool.submit(self._fetch, self.order[self._position])

    def take(self, index: int) -> Tensors:
        """The tensors of item ``index``, ready on the device (which must be the next item of the order); starts
        reading the item after it."""
        if self._position >= len(self.order) or self.order[self._position] != index:
            expected = self.order[self._position] if self._position < len(self.order) else "none (order done)"
            raise RuntimeError(f"streamed item {index} requested out of the prefetch order {self.order}; "
                               f"expected {expected}")
        if self._pending is not None:
            pending, self._pending = self._pending, None
            tensors, event = pending.result()  # an exception raised in the reader is raised here
        else:
            tensors, event = self._fetch(index)
        self.transfer.ready(tensors, event)
        self._position += 1
        self._submit()
        return tensors

    def close(self) -> None:
        """Stop: a read still under way (the sweep ended early) is waited for and its result dropped."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if not pending.cancel():
                concurrent.futures.wait([pending])
        if self._pool is not None:
            self._pool.shutdown(wait=True)
