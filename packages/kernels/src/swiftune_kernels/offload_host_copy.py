"""The host copy of one offloaded layer input, in power-of-two pinned pieces, the registry that orders the copies
back (each fetch starts the upload of the previous layer's input), and the bound on what the copies may pin.

The bound: a host that runs out of memory kills the process, and the whole run with it. A device out-of-memory
error, by contrast, is an exception the trainer reports. So the copies of a process together pin at most
:data:`HOST_OFFLOAD_FRACTION` of the host memory that was available when the first copy was made (or the bound
given to :func:`set_host_offload_bytes`); past it, a layer keeps its input on the device and is recomputed from there.

A copy may carry ``followers`` (the intermediates its layer parked, :mod:`swiftune_kernels.recompute_parking`), whose
uploads start right after its own; such copies are made with ``register=False`` and stay out of the layer order.

Used by :mod:`swiftune_kernels.offloaded_checkpoint`. On the CPU the copy is a plain (unpinned) one through the
same pieces, so that the tests prove the logic there.
"""

from __future__ import annotations

import collections
import os
import threading
import warnings
import weakref

import torch

# Bounds of the pieces a host copy is split into (see host_piece_sizes): powers of two, in bytes.
HOST_PIECE_MAX_BYTES = 1 << 30
HOST_PIECE_MIN_BYTES = 1 << 20


def host_piece_sizes(nbytes: int, largest: int | None = None, smallest: int | None = None) -> list[int]:
    """Sizes of the host buffers, each a power of two in bytes, that together hold a copy of ``nbytes`` bytes.

    PyTorch's caching host allocator rounds every pinned allocation up to the next power of two (for reuse), so
    one buffer for a 2.5 GiB layer input takes 4 GiB: 32 such layers pinned 128 GiB and got the process killed.
    Buffers that are powers of two lose nothing to that rounding: full pieces of ``largest``, then the binary
    decomposition of the rest, rounded up to a multiple of ``smallest`` so that only the last (smallest) piece
    holds unused bytes, fewer than ``smallest``. Capping pieces at ``largest`` also lets the allocator's cached
    blocks, one free list per power of two, serve every layer and step whatever the sequence length. A copy of at
    most ``smallest`` bytes is one piece, the next power of two.

    Args:
        nbytes: bytes to hold.
        largest: largest piece, a power of two; default :data:`HOST_PIECE_MAX_BYTES`.
        smallest: smallest piece of a copy larger than it, a power of two no larger than ``largest``; default
            :data:`HOST_PIECE_MIN_BYTES`.

    Returns:
        Piece sizes in bytes, largest first; empty for 0 bytes. At most ``ceil(nbytes / largest) +
        log2(largest / smallest)`` pieces.
    """
    largest = HOST_PIECE_MAX_BYTES if largest is None else largest
    smallest = HOST_PIECE_MIN_BYTES if smallest is None else smallest
    for name, value in (("largest", largest), ("smallest", smallest)):
        if not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two in bytes (e.g. 2**20), got {value!r}.")
    if smallest > largest:
        raise ValueError(f"smallest ({smallest}) must not exceed largest ({largest}); swap or lower them.")
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}.")
    if nbytes <= smallest:
        return [1 << (nbytes - 1).bit_length()] if nbytes else []
    full, rest = divmod(-(-nbytes // smallest) * smallest, largest)
    bits = [largest >> shift for shift in range(1, (largest // smallest).bit_length())]
    return [largest] * full + [bit for bit in bits if rest & bit]


class _HostPieces(list):
    """The host buffers (flat uint8) of one copy, in order; asked like a tensor whether they are pinned."""

    def is_pinned(self) -> bool:
        return bool(self) and all(piece.is_pinned() for piece in self)

    @property
    def nbytes(self) -> int:
        return sum(piece.numel() for piece in self)


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` as one flat uint8 tensor (of a contiguous copy when ``tensor`` is not contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


# Reentrant: a copy freed by the garbage collector (HostCopy.__del__) gives its bytes back, maybe while this thread
# holds the lock.
_LOCK = threading.RLock()
# Host copies not yet fetched back, in forward order. Weak, so a graph freed without backward leaks nothing.
_PENDING: list[weakref.ref[HostCopy]] = []
_STREAMS: dict[tuple[int, str], torch.cuda.Stream] = {}
# Device sources of layer-input copies still held, oldest first, as [source, download event] (HostCopy._hold_source).
# Not the copies themselves: a copy dropped without its backward must free its host pieces at once.
_HELD: collections.deque[list] = collections.deque()
# How many such sources stay held while their copies run: the newest layer's.
HELD_SOURCES = 1


def _side_stream(device: torch.device, direction: str) -> torch.cuda.Stream:
    # One stream per direction: an early backward upload need not queue behind the last forward download.
    key = (device.index if device.index is not None else torch.cuda.current_device(), direction)
    with _LOCK:
        if key not in _STREAMS:
            _STREAMS[key] = torch.cuda.Stream(device=key[0])
        return _STREAMS[key]


def register_pinned(host: torch.Tensor) -> torch.Tensor:
    """``host`` (a contiguous CPU tensor) page-locked in place, at its exact size, while it lives; a pinned copy from
    PyTorch's pool (which rounds up to a power of two) where registration fails; ``host`` itself without CUDA."""
    if not torch.cuda.is_available() or host.numel() == 0:
        return host
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
    if int(status) != 0:
        # Registration can fail (a locked-memory limit, an unsupported allocation): PyTorch's pinned pool instead.
        return host.pin_memory()
    weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())
    return host


# Share of the host's available memory that offloaded layer inputs may pin: the rest is for the process itself, the
# other programs of the machine, and the data pipeline.
HOST_OFFLOAD_FRACTION = 0.7
# Bytes the live copies hold, and the bound (None until the first copy, or until set_host_offload_bytes).
_HOST_BUDGET: dict = {"pinned": 0, "bound": None, "warned": False, "shared": 0}


def available_host_bytes() -> float:
    """Host memory available to new allocations (Linux MemAvailable; free physical pages elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def set_host_offload_bytes(bound: float | None) -> None:
    """Bound the host bytes that offloaded layer inputs may hold at once; None: measure it again at the next copy
    (:data:`HOST_OFFLOAD_FRACTION` of the available host memory)."""
    if bound is not None and (not isinstance(bound, int | float) or isinstance(bound, bool) or bound < 0):
        raise ValueError(f"bound must be a non-negative number of bytes or None, got {bound!r}.")
    with _LOCK:
        _HOST_BUDGET["bound"] = None if bound is None else float(bound)


def host_offload_bytes() -> tuple[int, float | None]:
    """(bytes the live host copies hold now, the bound: None until the first copy measures it)."""
    with _LOCK:
        return _HOST_BUDGET["pinned"], _HOST_BUDGET["bound"]


def _reserve_host_bytes(nbytes: int, share: float | None = None) -> bool:
    """Count ``nbytes`` of a new copy against the bound; False when they do not fit.

    ``share``: the copy is one of the optional kind (recompute_parking), whose copies together may hold at most
    that fraction of the bound and are refused silently; the layer inputs' copies (``share`` None) may use it all,
    and warn once per process when refused.

    The bound is measured at the first copy of the process, before any of its pinned memory exists: measured later,
    it would miss the pinned blocks that PyTorch's host allocator keeps cached for the next step's copies.
    """
    with _LOCK:
        if _HOST_BUDGET["bound"] is None:
            _HOST_BUDGET["bound"] = HOST_OFFLOAD_FRACTION * available_host_bytes()
        bound = _HOST_BUDGET["bound"]
        fits = _HOST_BUDGET["pinned"] + nbytes <= bound
        if share is not None:
            if fits and _HOST_BUDGET["shared"] + nbytes <= share * bound:
                _HOST_BUDGET["pinned"] += nbytes
                _HOST_BUDGET["shared"] += nbytes
                return True
            return False
        if fits:
            _HOST_BUDGET["pinned"] += nbytes
            return True
        warn = not _HOST_BUDGET["warned"]
        _HOST_BUDGET["warned"] = True
    if warn:
        warnings.warn(
            f"Offloaded checkpointing: the layer inputs parked in host memory reached the bound of "
            f"{bound / 2**30:.1f} GiB ({HOST_OFFLOAD_FRACTION:.0%} of the host memory available at the first copy); "
            "further layers keep their input on the GPU. If the GPU then runs out of memory, train on shorter "
            "sequences or on a machine with more RAM.",
            stacklevel=5,
        )
    return False


def _release_host_bytes(nbytes: int, shared: bool = False) -> None:
    with _LOCK:
        _HOST_BUDGET["pinned"] = max(0, _HOST_BUDGET["pinned"] - nbytes)
        if shared:
            _HOST_BUDGET["shared"] = max(0, _HOST_BUDGET["shared"] - nbytes)


def _newest_on(refs: list[weakref.ref[HostCopy]], device: torch.device) -> HostCopy | None:
    """The last live copy on ``device`` among ``refs`` (registry order: the latest layer last)."""
    return next((c for ref in reversed(refs) if (c := ref()) is not None and c.device == device), None)


def _release_finished_sources() -> None:
    """Release the held sources whose downloads the host sees done (no stream needs to wait for those)."""
    with _LOCK:
        while _HELD and (_HELD[0][0] is None or _HELD[0][1].query()):
            _HELD.popleft()[0] = None


def _release_source(held: list) -> None:
    """Release one held source: the current stream waits for its download first (a no-op if it is released)."""
    source, stored = held
    if source is not None:
        torch.cuda.current_stream(source.device).wait_event(stored)
        held[0] = None


class HostCopy:
    """One layer input parked in CPU memory (pinned where CUDA runs), in power-of-two pieces
    (:func:`host_piece_sizes`), with the events that order its download and upload."""

    @classmethod
    def park(cls, tensor: torch.Tensor, register: bool = True, share: float | None = None) -> HostCopy | None:
        """Start a copy of ``tensor`` whose bytes count against the host bound until it is fetched or freed; None,
        and no copy, when they do not fit (the caller then keeps ``tensor`` on its device). ``register`` and
        ``share``: as in :meth:`__init__` and ``_reserve_host_bytes``."""
        sizes = host_piece_sizes(tensor.numel() * tensor.element_size(), HOST_PIECE_MAX_BYTES, HOST_PIECE_MIN_BYTES)
        if not _reserve_host_bytes(sum(sizes), share):
            return None
        return cls(tensor, sizes, reserved=sum(sizes), register=register, shared=share is not None)

    def __init__(
        self,
        tensor: torch.Tensor,
        sizes: list[int] | None = None,
        reserved: int = 0,
        register: bool = True,
        shared: bool = False,
    ) -> None:
        """Start the copy of ``tensor`` into pieces of ``sizes`` (default :func:`host_piece_sizes`); ``reserved``:
        the bytes counted against the host bound for it (:meth:`park`), given back when it is fetched or freed.
        ``register``: join the layer-input order, so that fetching this copy starts the upload of the one
        registered before it (False for copies that travel with a registered one, as its ``followers``)."""
        self.reserved, self.shared = reserved, shared
        self.device = tensor.device
        self.shape, self.dtype = tensor.shape, tensor.dtype
        self.stored: torch.cuda.Event | None = None
        self.restored: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self._held: list = [None, None]  # [device source still held, its download event] (_hold_source)
        # Objects with a prefetch() (a recompute_parking.ParkingLot) whose uploads start right after this one's.
        self.followers: list = []
        # The CPU takes the same pieces, unpinned, so that its tests prove the split and the reassembly.
        pin = tensor.is_cuda
        if sizes is None:
            nbytes = tensor.numel() * tensor.element_size()
            sizes = host_piece_sizes(nbytes, HOST_PIECE_MAX_BYTES, HOST_PIECE_MIN_BYTES)
        self.host: _HostPieces | None = _HostPieces(
            torch.empty(size, dtype=torch.uint8, pin_memory=pin) for size in sizes
        )
        if tensor.is_cuda:
            main = torch.cuda.current_stream(self.device)
            download = _side_stream(self.device, "d2h")
            source = _byte_view(tensor)  # a non-contiguous input is made contiguous on the main stream
            download.wait_stream(main)  # the kernel that produced the input may still be running
            with torch.cuda.stream(download):
                self._copy_pieces(source, to_host=True)
            self.stored = torch.cuda.Event()
            self.stored.record(download)
            self._hold_source(source) if register else source.record_stream(download)
        else:
            # CPU: the input is released exactly as on the GPU (the pieces own new storage) and the tests see it.
            self._copy_pieces(_byte_view(tensor), to_host=True)
        if register:
            with _LOCK:
                _PENDING[:] = [ref for ref in _PENDING if ref() is not None]
                _PENDING.append(weakref.ref(self))

    def _hold_source(self, source: torch.Tensor) -> None:
        """Keep ``source`` (the input's bytes) until its block can go back to the allocator safely.

        The caller drops the input next, and its block must not be handed out again before the download has read
        it. ``record_stream`` would ensure that, but it frees the block only once the host sees the copy done; a
        host that runs layers ahead of the device (a step replayed from CUDA graphs issues its forward in a fifth
        of the device's time) then holds many layers' inputs at once (26 x 32 MiB at one point of the 8B step). Instead,
        a source is released as soon as the host sees its copy done, or when the next layer's copy starts: then
        the main stream waits for it (on the device's clock it ended during this layer's compute) and the block
        goes back to its pool in stream order, reusable at once.
        """
        self._held = [source, self.stored]
        with _LOCK:
            _release_finished_sources()
            _HELD.append(self._held)
            while len(_HELD) > HELD_SOURCES:
                _release_source(_HELD.popleft())

    @property
    def host_bytes(self) -> int:
        """Host bytes this copy holds (the pieces' sizes, which the caching host allocator does not round up)."""
        return self.host.nbytes if self.host is not None else 0

    def _copy_pieces(self, flat: torch.Tensor, to_host: bool) -> None:
        """Copy the flat bytes ``flat`` into the pieces, or the pieces into it; one copy per piece, on the stream
        current now, non-blocking (the pinned pieces make the CUDA copies asynchronous)."""
        start = 0
        for piece in self.host:
            length = min(piece.numel(), flat.numel() - start)
            if to_host:
                piece[:length].copy_(flat[start : start + length], non_blocking=True)
            else:
                flat[start : start + length].copy_(piece[:length], non_blocking=True)
            start += length

    def prefetch(self) -> None:
        """Start the upload (idempotent), then the followers'; the backward of the next-later layer calls this."""
        if self.restored is None and self.host is not None:
            self._upload()
        for follower in self.followers:
            follower.prefetch()

    def _upload(self) -> None:
        if self.stored is None:
            # Contiguous, so its flat byte view shares its storage and the pieces land in it.
            restored = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self._copy_pieces(_byte_view(restored), to_host=False)
            self.restored = restored
            return
        # Allocated on the main stream, where it is used and freed: its block goes back in stream order, reusable
        # at once, and the copy starts when the device reaches this point (one layer's backward before the input
        # is needed, against a copy of a fraction of that). Allocated on the upload stream instead, the blocks
        # came back only once the host saw the main stream's work done (record_stream): a host far ahead of the
        # device (layers replayed from CUDA graphs) then held twenty uploaded inputs at once at Llama-8B.
        main = torch.cuda.current_stream(self.device)
        restored = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        upload = _side_stream(self.device, "h2d")
        upload.wait_event(self.stored)
        upload.wait_stream(main)
        with torch.cuda.stream(upload):
            self._copy_pieces(_byte_view(restored), to_host=False)
        self.restored = restored
        self.ready = torch.cuda.Event()
        self.ready.record(upload)

    def fetch(self) -> torch.Tensor:
        """Return the input on its device (usable on the current stream) and prefetch the previous layer's."""
        self.prefetch()
        previous = None
        with _LOCK:
            live = [ref for ref in _PENDING if ref() is not None]
            position = next((i for i, ref in enumerate(live) if ref() is self), None)
            if position is not None:
                previous = _newest_on(live[:position], self.device)
                del live[position]
            _PENDING[:] = live
        if previous is not None:
            previous.prefetch()
        _release_source(self._held)
        _release_finished_sources()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        tensor, self.restored, self.host = self.restored, None, None
        self._release()
        return tensor

    @staticmethod
    def prefetch_newest(device: torch.device) -> None:
        """Start the upload of the newest copy on ``device`` not yet fetched: the backward of a checkpointed layer
        whose input stayed on the device calls this, so that the nearest earlier offloaded layer's copies do not
        wait for that layer's own backward to start."""
        with _LOCK:
            newest = _newest_on(_PENDING, device)
        if newest is not None:
            newest.prefetch()

    def discard(self) -> None:
        """Free the host copy without bringing it back (a pending upload keeps its buffers until it is done)."""
        _release_source(self._held)
        self.restored, self.host = None, None
        self._release()

    def _release(self) -> None:
        if self.reserved:
            _release_host_bytes(self.reserved, self.shared)
            self.reserved = 0

    def __del__(self) -> None:
        # A graph freed without its backward frees its copies here: their bytes no longer count against the bound.
        try:
            self._release()
        except (AttributeError, TypeError):  # at interpreter exit, module globals may already be gone
            pass
