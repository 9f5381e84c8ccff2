"""Intermediates that a checkpointed layer's forward parks in host memory for its recompute to take back.

A checkpointed layer runs its forward twice: once keeping nothing, and again in backward to rebuild the graph.
Part of what that recompute rebuilds costs far more tensor-core time than copy-engine time: the gate and up
pre-activations of a Llama-8B MLP are ~70% of a recomputed layer's FLOPs (two T x 4096 x 14336 matmuls, and
their NF4 dequantization under QLoRA), and the copy engines that would move them sit idle otherwise. So the first
forward may park such a tensor here (a copy to pinned host memory on a side stream), and the recompute takes it
back instead of computing it.

The copies ride with the layer's offloaded input (:class:`swiftune_kernels.offload_host_copy.HostCopy`): they
start back to the device when the input does, while the next-later layer runs its backward, and what the recompute
did not take is freed after it. Only layers whose input is offloaded park (a lot exists only there), and the
parked tensors never take more than :data:`PARK_HOST_SHARE` of the host bound, so that layer inputs, which free
device memory, keep priority over intermediates, which only save time.

Correctness rests on what checkpointing already assumes: the recompute repeats the forward exactly (same inputs,
same RNG state), so the parked tensor is the one the recompute would compute. A taker names what it expects (a
key, shape and dtype) and computes the tensor itself when the next parked one does not match.

Opt-in (``apply_offloaded_checkpointing(..., park_intermediates=True)``): on an H100 it cut the GPU time of an 8B
QLoRA step by 16%, but did not make the step reliably faster (docs/BENCHMARKS.md, sixth round). No Triton kernel:
stream and bookkeeping plumbing, proven on the CPU (plain copies) and by the CUDA tests where a GPU runs them.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
from collections.abc import Hashable, Iterator

import torch

from swiftune_kernels.offload_host_copy import HostCopy

# Share of the host bound (offload_host_copy) that parked intermediates may hold together.
PARK_HOST_SHARE = 0.5
# A copy keeps its device buffer alive until it has read it. The link (~55 GB/s on an H100 host) moves a Llama-8B
# layer's gate and up (235 MB at 4096 tokens) in ~4.3 ms, about as long as that layer's forward takes, so the
# downloads can fall behind the compute. Two rules keep that in check:
# - a tensor is parked only while fewer than PARK_MAX_BEHIND parked copies are still downloading although the
#   compute has passed the point where they were queued (what the device has done, read without waiting);
# - past PARK_MAX_IN_FLIGHT unfinished copies, the main stream waits for the oldest, a bound on the buffers held
#   even when the host runs far ahead of the device and the first rule sees late.
PARK_MAX_BEHIND = 2
PARK_MAX_IN_FLIGHT = 4

# A ParkingLot, or any object with its park() (slot_parking's); and one with its take() and release().
_FORWARD_LOT: contextvars.ContextVar[ParkingLot | None] = contextvars.ContextVar("swiftune_park", default=None)
_RECOMPUTE_LOT: contextvars.ContextVar[ParkingLot | None] = contextvars.ContextVar("swiftune_unpark", default=None)
# (device, main-stream event where it was queued, download event) of the parked copies not yet seen finished
_IN_FLIGHT: collections.deque = collections.deque()


class ParkingLot:
    """The intermediates one checkpointed layer's forward parked, in the order it parked them."""

    def __init__(self) -> None:
        self.copies: collections.deque[tuple[Hashable, HostCopy]] = collections.deque()

    def park(self, key: Hashable, tensor: torch.Tensor) -> bool:
        """Start a host copy of ``tensor`` under ``key``; False (nothing parked) when the host bound is reached."""
        if tensor.is_cuda and not _link_keeps_up(tensor.device):
            return False
        copy = HostCopy.park(tensor, register=False, share=PARK_HOST_SHARE)
        if copy is None:
            return False
        self.copies.append((key, copy))
        if copy.stored is not None:
            queued = torch.cuda.Event()
            queued.record(torch.cuda.current_stream(tensor.device))
            _IN_FLIGHT.append((tensor.device, queued, copy.stored))
        return True

    def prefetch(self) -> None:
        """Start every parked copy's upload (idempotent)."""
        for _, copy in self.copies:
            copy.prefetch()

    def take(self, key: Hashable, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """The next parked tensor on the device when it is ``key`` with ``shape`` and ``dtype``; else None, and
        everything parked is dropped (the recompute did not repeat the forward, so nothing later can be trusted)."""
        if not self.copies:
            return None
        parked_key, copy = self.copies[0]
        if parked_key != key or copy.shape != shape or copy.dtype != dtype:
            self.release()
            return None
        self.copies.popleft()
        return copy.fetch()

    def release(self) -> None:
        """Drop what was not taken; its host bytes count no more."""
        while self.copies:
            _, copy = self.copies.popleft()
            copy.discard()

    def __len__(self) -> int:
        return len(self.copies)


def _link_keeps_up(device: torch.device) -> bool:
    """Whether to park one more tensor on ``device`` (the two rules above); may make its main stream wait."""
    while _IN_FLIGHT and _IN_FLIGHT[0][2].query():
        _IN_FLIGHT.popleft()
    mine = [(queued, stored) for dev, queued, stored in _IN_FLIGHT if dev == device]
    behind = sum(1 for queued, stored in mine if queued.query() and not stored.query())
    if behind >= PARK_MAX_BEHIND:
        return False
    if len(mine) >= PARK_MAX_IN_FLIGHT:
        torch.cuda.current_stream(device).wait_event(mine[len(mine) - PARK_MAX_IN_FLIGHT][1])
    return True


@contextlib.contextmanager
def parking_for_forward(lot: ParkingLot | None) -> Iterator[None]:
    """While a checkpointed layer runs its first forward: :func:`park_for_recompute` parks into ``lot``."""
    token = _FORWARD_LOT.set(lot)
    try:
        yield
    finally:
        _FORWARD_LOT.reset(token)


@contextlib.contextmanager
def parked_for_recompute(lot: ParkingLot | None) -> Iterator[None]:
    """While a checkpointed layer is recomputed: :func:`take_parked` takes from ``lot``; the rest is dropped after."""
    token = _RECOMPUTE_LOT.set(lot)
    try:
        yield
    finally:
        _RECOMPUTE_LOT.reset(token)
        if lot is not None:
            lot.release()


def parking_in_forward() -> bool:
    """Whether the code running now is a forward that parks intermediates whose copies may still be reading them
    (a slot-parking forward, :mod:`swiftune_kernels.slot_parking`, copies at once: False there)."""
    lot = _FORWARD_LOT.get()
    return lot is not None and not getattr(lot, "copies_at_once", False)


def park_for_recompute(key: Hashable, tensor: torch.Tensor) -> bool:
    """In a checkpointed layer's first forward, park ``tensor`` for the layer's recompute to take back with
    :func:`take_parked` (same ``key``); True when it was parked. Do not write ``tensor`` in place afterwards: the
    copy may still be reading it."""
    lot = _FORWARD_LOT.get()
    return lot.park(key, tensor) if lot is not None else False


def park_destination(key: Hashable, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """In a slot-parking forward (:mod:`swiftune_kernels.slot_parking`), the buffer to write the tensor ``key`` into
    so that it is parked without a copy (its slot); else None. Do not write it again after the tensor is made."""
    lot = _FORWARD_LOT.get()
    destination = getattr(lot, "destination", None)
    return destination(key, shape, dtype, device) if destination is not None else None


def take_parked(key: Hashable, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """In a checkpointed layer's recompute, the tensor its forward parked under ``key`` (on the device, ready on
    the current stream), or None: compute it then."""
    lot = _RECOMPUTE_LOT.get()
    return lot.take(key, shape, dtype) if lot is not None else None
