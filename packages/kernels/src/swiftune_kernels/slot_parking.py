"""Parking through fixed device slots: how a checkpointed layer replayed from CUDA graphs parks an intermediate on
the host for its recompute (the graph-friendly form of :mod:`swiftune_kernels.recompute_parking`).

recompute_parking starts a host copy of the tensor the forward made and keeps that tensor alive until the copy has
read it. Inside a CUDA graph neither works: a replay writes its temporaries at fixed addresses of the graphs' shared
pool, which the next layer's replay reuses at once, and no Python runs during a replay to start a copy. So here:

- **Forward.** The layer's forward writes the tensor (the fused LoRA MLP's gate pre-activation) straight into a
  *slot*: one of :data:`SLOTS` device buffers of its shape, the same for every layer of that index modulo ``SLOTS``
  (the matmul's output buffer is the slot, so a graph captures that address and no copy is made). After the forward,
  eager or replayed, a copy stream moves the slot to the layer's own pinned host buffer while the next layer
  computes; a later forward that writes the same slot first waits for that copy.
- **Backward.** The upload into the slot starts with the layer's offloaded input (one layer ahead, as a follower of
  its :class:`~swiftune_kernels.offload_host_copy.HostCopy`), and the recompute reads the slot instead of computing
  the tensor (its matmul and, under QLoRA, the weight's dequantization). The slot is free for the next writer once
  that backward is done.

A layer's host buffer holds the tensor of its latest forward only: a backward whose forward has been followed by
another forward of the same layer (two forwards before their backwards) computes the tensor again, as it does when
nothing was parked. Whether a graph parks, and whether a backward takes, are part of the graphs' signatures, so a
replay never reads a slot that this step did not fill.

Memory: the slots stay allocated (``SLOTS`` x the tensor: 224 MiB for a Llama-8B gate at 4096 tokens) and the
host buffers stay pinned (one tensor per parking layer, counted against the host bound of
:mod:`swiftune_kernels.offload_host_copy` in the parking share). The forward and the recompute no longer allocate
the tensor in the graphs' pool. No Triton kernel: copy and stream plumbing, proven on the CPU (plain
copies through the same buffers) and on a GPU by the tests that run there.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from swiftune_kernels.offload_host_copy import (
    _release_host_bytes,
    _reserve_host_bytes,
    _side_stream,
    register_pinned,
)
from swiftune_kernels.recompute_parking import PARK_HOST_SHARE, parking_for_forward

# Slots per parked tensor: one layer's slot is copied to the host while the next layer writes the other one. The
# host link moves a Llama-8B gate (112 MiB) in ~2.1 ms against ~3 ms of a layer's forward, so two are enough.
SLOTS = 2
# What a slot-parking forward parks, by the name its kernel offers it under (lora_mlp: "gate", "up"). The gate comes
# first in the layer, so its copy has the longest time to finish; gate and up together would take ~4.3 ms a layer
# on the link, longer than the forward.
SLOT_PARKED = ("gate",)


class _Slot:
    """One fixed device buffer, and the event after which it may be written again (None: at once)."""

    __slots__ = ("buffer", "free")

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.free: torch.cuda.Event | None = None


# (name, device, shape, dtype, slot index) -> _Slot
_SLOTS: dict[tuple, _Slot] = {}


def slot_bytes() -> int:
    """Device bytes the slots of every device hold (allocations: ``torch.cuda.memory_allocated`` counts them)."""
    return sum(slot.buffer.numel() * slot.buffer.element_size() for slot in _SLOTS.values())


def release_slots() -> None:
    """Forget every slot (graphs captured with them must be dropped first: ``LayerGraphs.clear``)."""
    _SLOTS.clear()


def _slot(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device, index: int) -> tuple | None:
    """The key of slot ``index`` for a tensor of ``shape`` and ``dtype`` on ``device``, allocated if need be; None
    while a CUDA graph is being captured and the slot does not exist yet (it would come from the graphs' pool)."""
    key = (name, device, torch.Size(shape), dtype, index % SLOTS)
    if key not in _SLOTS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _SLOTS[key] = _Slot(torch.empty(shape, dtype=dtype, device=device))
    return key


class _ForwardLot:
    """What one forward call of a layer parks: the slots it wrote. Copies at once, so the kernel that offered the
    tensor may overwrite it afterwards (:func:`swiftune_kernels.recompute_parking.parking_in_forward` is False)."""

    copies_at_once = True

    def __init__(self, index: int) -> None:
        self.index = index
        self.parked: list[tuple] = []

    def park(self, key: Hashable, tensor: torch.Tensor) -> bool:
        """Copy ``tensor`` into its slot; False (nothing parked) when ``key`` is not to be parked, or is already."""
        buffer = self.destination(key, tensor.shape, tensor.dtype, tensor.device)
        if buffer is None:
            return False
        buffer.copy_(tensor)
        return True

    def destination(self, key: Hashable, shape: torch.Size, dtype: torch.dtype, device) -> torch.Tensor | None:
        """The slot that the tensor ``key`` is to be written into (counted as parked), or None: not parked."""
        name = key[0] if isinstance(key, tuple) and key else key
        if name not in SLOT_PARKED or any(slot_key[0] == name for slot_key in self.parked):
            return None
        slot_key = _slot(name, shape, dtype, torch.device(device), self.index)
        if slot_key is None:
            return None
        self.parked.append(slot_key)
        return _SLOTS[slot_key].buffer


class _RecomputeLot:
    """What one recompute may take: the slots its forward filled, read in place. A take does not consume (a graph's
    capture runs the recompute twice, eagerly and captured, and both must read the slot)."""

    def __init__(self, slot_keys: tuple) -> None:
        self.slot_keys = slot_keys

    def take(self, key: Hashable, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        name = key[0] if isinstance(key, tuple) and key else key
        for slot_key in self.slot_keys:
            if slot_key[0] == name and slot_key[2] == shape and slot_key[3] == dtype:
                return _SLOTS[slot_key].buffer
        return None

    def release(self) -> None:
        """Nothing to drop: the slots stay, and the host buffers are the layer's."""


class LayerParking:
    """One checkpointed layer's slot parking: its slot index, its host buffers, and which forward they hold.

    Used by :mod:`swiftune_kernels.offloaded_checkpoint` around each forward and backward of the layer; see the module
    docstring for the order of copies and waits.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.generation = 0  # bumped by every forward that parked: which forward the host buffers hold
        self._host: dict[tuple, torch.Tensor] = {}  # slot key -> pinned host buffer of its shape
        self._reserved = 0
        self._parked: tuple = ()  # slot keys the latest parking forward filled
        self._uploaded: int | None = None  # generation whose upload was started
        self._ready: torch.cuda.Event | None = None

    def signature(self) -> tuple:
        """What a captured forward or backward of this layer depends on: which slots it writes or reads."""
        return ("slots", SLOT_PARKED, self.index % SLOTS)

    # --- forward ---

    def before_forward(self, device: torch.device) -> None:
        """Let the current stream wait until this layer's slots may be written (their last copy or reader is done)."""
        if device.type != "cuda":
            return
        stream = torch.cuda.current_stream(device)
        for key, slot in _SLOTS.items():
            if key[1] == device and key[4] == self.index % SLOTS and slot.free is not None:
                stream.wait_event(slot.free)

    def wrap_forward(self, run: Callable) -> Callable:
        """``run(hidden_states, arg_tensors) -> (spec, tensors)`` as a parking forward whose spec also says which
        slots it filled: ``((spec, slot keys), tensors)``, the same for a capture and its replays."""

        def parking_run(hidden_states, arg_tensors):
            lot = _ForwardLot(self.index)
            with parking_for_forward(lot):
                spec, tensors = run(hidden_states, arg_tensors)
            return (spec, tuple(lot.parked)), tensors

        return parking_run

    def after_forward(self, slot_keys: tuple) -> int | None:
        """Start the copies of the slots a forward filled (on the current stream's clock) to this layer's host
        buffers; the generation that its backward asks for, or None when nothing was parked (nothing filled, or the
        host bound refused the buffers)."""
        if not slot_keys or not self._host_buffers(slot_keys):
            return None
        self.generation += 1
        self._parked, self._uploaded = tuple(slot_keys), None
        for key in slot_keys:
            slot, host = _SLOTS[key], self._host[key]
            if not slot.buffer.is_cuda:
                host.copy_(slot.buffer)
                continue
            main = torch.cuda.current_stream(slot.buffer.device)
            copies = _side_stream(slot.buffer.device, "park")
            copies.wait_stream(main)
            with torch.cuda.stream(copies):
                host.copy_(slot.buffer, non_blocking=True)
            slot.free = torch.cuda.Event()
            slot.free.record(copies)
        return self.generation

    def _host_buffers(self, slot_keys: tuple) -> bool:
        """Make the host buffers for ``slot_keys`` (kept for the next steps); False when the bound refuses them."""
        for key in slot_keys:
            if key in self._host:
                continue
            _, device, shape, dtype, _ = key
            nbytes = shape.numel() * dtype.itemsize
            if not _reserve_host_bytes(nbytes, PARK_HOST_SHARE):
                return False
            self._reserved += nbytes
            host = torch.empty(shape, dtype=dtype)
            self._host[key] = register_pinned(host) if device.type == "cuda" else host
        return True

    # --- backward ---

    def prefetch(self) -> None:
        """Start the upload of the latest parked forward's tensors into their slots (idempotent); called as a follower
        of the layer input's host copy, one layer ahead of this layer's backward."""
        if not self._parked or self._uploaded == self.generation:
            return
        self._uploaded = self.generation
        self._ready = None
        for key in self._parked:
            slot, host = _SLOTS[key], self._host[key]
            if not slot.buffer.is_cuda:
                slot.buffer.copy_(host)
                continue
            # after everything queued on the main stream so far: the slot's earlier readers (later layers' backwards)
            main = torch.cuda.current_stream(slot.buffer.device)
            copies = _side_stream(slot.buffer.device, "park")
            copies.wait_stream(main)
            with torch.cuda.stream(copies):
                slot.buffer.copy_(host, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(copies)

    def recompute_lot(self, generation: int | None) -> _RecomputeLot | None:
        """For the backward of the forward that parked ``generation``: a lot whose takes read the slots, ready on the
        current stream; None when that forward parked nothing or a later forward has overwritten its host buffers."""
        if generation is None or generation != self.generation or not self._parked:
            return None
        self.prefetch()
        if self._ready is not None:
            torch.cuda.current_stream(self._parked[0][1]).wait_event(self._ready)
        return _RecomputeLot(self._parked)

    def after_backward(self, lot: _RecomputeLot) -> None:
        """The backward that read ``lot``'s slots is queued: later writers of those slots wait for it."""
        for key in lot.slot_keys:
            slot = _SLOTS[key]
            if slot.buffer.is_cuda:
                slot.free = torch.cuda.Event()
                slot.free.record(torch.cuda.current_stream(slot.buffer.device))
        self._parked = ()

    def release(self) -> None:
        """Give back the host buffers and their count against the host bound."""
        if any(host.is_pinned() for host in self._host.values()):
            torch.cuda.synchronize()  # a copy may still be writing or reading one: wait before it is unregistered
        self._host.clear()
        self._parked, self._uploaded, self._ready = (), None, None
        if self._reserved:
            _release_host_bytes(self._reserved, shared=True)
            self._reserved = 0

    def __del__(self) -> None:
        try:
            self.release()
        except (AttributeError, TypeError, RuntimeError):  # at interpreter exit, globals or CUDA may be gone
            pass
