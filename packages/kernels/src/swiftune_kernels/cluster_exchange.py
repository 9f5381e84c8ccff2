"""One float32 from every CTA of a thread-block cluster to all of them (sm_90+), and the launch of such kernels.

A kernel compiled by Triton for one CTA is launched with a cluster dimension: the CTAs of a cluster are
co-scheduled on one GPC, so they can wait for each other without deadlock. :func:`cluster_all_gather` sends a
CTA's value into a slot of every partner's shared memory with ``st.async``, whose bytes are counted on the
partner's mbarrier: a CTA waits only until its partners' values have landed. No fence and no cluster barrier is
needed, and loads issued before the exchange stay in flight across it. (A ``barrier.cluster`` with release
semantics compiles to a full GPU memory barrier that waits for those loads: on an H100 it cost the cross-entropy
kernel ten points of copy bandwidth.)

The exchange area lives in dynamic shared memory placed after Triton's own (``global_smem`` is the symbol of
Triton's shared memory in the PTX it emits; a kernel must use some, e.g. for a reduction across warps, for the
symbol to exist): two rounds of ``split`` float32 slots (a CTA's own slot stays unused: it keeps its value in
registers), then two mbarriers. Rounds alternate, so a partner one round ahead cannot overwrite a slot still being
read. A partner can never be two rounds ahead, as it needs this CTA's value of the round in between.

None of this runs under the interpreter (inline PTX): kernels keep an exchange through global memory across two
launches for it, and the GPU tests cover this path.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.errors import TritonError

from swiftune_kernels.compiled_launch import triton_version


@triton.jit
def cluster_exchange_init(mbar_offset):
    """Thread 0 initializes the two mbarriers at ``global_smem + mbar_offset``; then the whole cluster syncs once,
    so that no partner's ``st.async`` reaches an uninitialized mbarrier. Returns an int32 0."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t, m; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; mov.u32 m, global_smem; "
        "add.u32 m, m, $1; @p mbarrier.init.shared::cta.b64 [m], 1; add.u32 m, m, 8; "
        "@p mbarrier.init.shared::cta.b64 [m], 1; fence.mbarrier_init.release.cluster; "
        "barrier.cluster.arrive.release; barrier.cluster.wait.acquire; mov.u32 $0, 0; }",
        "=r,r",
        [mbar_offset],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _send_to_partners(value_bits, slot_offset, mbar_offset, split, rank):
    # threads t < split, t != rank: thread t writes the value into CTA t's slot, counted on CTA t's mbarrier (a CTA
    # keeps its own value in registers: no st.async to itself)
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t, a, ra, m, rm; mov.u32 t, %tid.x; setp.lt.u32 p, t, $4; "
        "setp.ne.and.u32 p, t, $5, p; mov.u32 a, global_smem; add.u32 a, a, $2; mov.u32 m, global_smem; "
        "add.u32 m, m, $3; @p mapa.shared::cluster.u32 ra, a, t; @p mapa.shared::cluster.u32 rm, m, t; "
        "@p st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [ra], $1, [rm]; mov.u32 $0, 0; }",
        "=r,r,r,r,r,r",
        [value_bits, slot_offset, mbar_offset, split, rank],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _expect_bytes(mbar_offset, nbytes):
    # thread 0: this CTA's one arrival of the round, expecting nbytes from the partners' st.async
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t, m; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; mov.u32 m, global_smem; "
        "add.u32 m, m, $1; @p mbarrier.arrive.expect_tx.shared::cta.b64 _, [m], $2; mov.u32 $0, 0; }",
        "=r,r,r",
        [mbar_offset, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _round_done(mbar_offset, phase):
    # 1 once the mbarrier's phase has completed (acquire: the values that st.async delivered are visible), else 0
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 m; mov.u32 m, global_smem; add.u32 m, m, $1; "
        "mbarrier.try_wait.parity.shared::cta.b64 p, [m], $2; selp.u32 $0, 1, 0, p; }",
        "=r,r,r",
        [mbar_offset, phase],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def shared_load(offsets):
    """float32 values at byte ``offsets`` from ``global_smem`` (Triton's shared memory; past it, the exchange area)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 a; mov.u32 a, global_smem; add.u32 a, a, $1; ld.shared.f32 $0, [a]; }",
        "=f,r",
        [offsets],
        dtype=tl.float32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def cluster_all_gather(value, rank, turn, exchange_offset, SPLIT: tl.constexpr):
    """The float32 scalar ``value`` of every CTA of the cluster, as a (SPLIT,) tensor ordered by rank, and an int32
    0 that the compiler cannot see through (add it to addresses that should be computed after the exchange).

    Args:
        value: this CTA's float32 scalar.
        rank: this CTA's rank in the cluster (0..SPLIT-1).
        turn: how many exchanges this CTA made before (the same count in every CTA of the cluster).
        exchange_offset: byte offset of the exchange area from ``global_smem`` (16-byte aligned).
        SPLIT: the cluster size.
    """
    parity = turn % 2
    slots = exchange_offset + 4 * SPLIT * parity
    mbar = exchange_offset + 8 * SPLIT + 8 * parity
    sent = _send_to_partners(value.to(tl.int32, bitcast=True), slots + 4 * rank, mbar, rank * 0 + SPLIT, rank)
    done = _expect_bytes(mbar + sent, 4 * (SPLIT - 1))
    while done == 0:
        done = _round_done(mbar, (turn // 2) % 2)
    token = done - 1
    ranks = tl.arange(0, SPLIT)
    return tl.where(ranks == rank, value, shared_load(slots + 4 * ranks + token)), token


def exchange_bytes(split: int) -> int:
    """Bytes of the exchange area: two rounds of ``split`` float32 slots and two 8-byte mbarriers."""
    return 8 * split + 16


def cluster_launch_supported(device: torch.device) -> bool:
    """Whether kernels of this module can launch on ``device``: a CUDA GPU of compute capability 9.0 or later,
    and a Triton whose compiled kernels launch with a cluster dimension taken from their metadata (3.3 or later:
    ``(num_warps, num_ctas, shared)``, the layout this module passes)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cluster_capable(index)


@functools.cache
def _cluster_capable(index: int) -> bool:
    # asked on every cross-entropy call: the answer cannot change within a process
    return triton_version() >= (3, 3) and torch.cuda.get_device_capability(index)[0] >= 9


_FIT: dict = {}


class ClusterKernelError(RuntimeError):
    """A cluster kernel did not compile here (e.g. a Triton whose PTX no longer names ``global_smem``)."""


def launch_in_clusters(kernel, clusters: int, split: int, args: list, constexprs: dict, **options) -> None:
    """Compile ``kernel`` for one CTA of ``options["num_warps"]`` warps and launch ``clusters`` clusters of
    ``split`` CTAs, with the exchange area after Triton's shared memory. Raises :class:`ClusterKernelError` where the
    kernel does not compile.

    ``args``: the kernel's non-constexpr parameters in order; the last one is the exchange area's offset and is
    filled in here. ``constexprs``: the constexpr parameters, in order, by name. ``clusters`` is capped at the
    number of clusters that fit on the GPU at once (the kernel is persistent: its clusters walk the rows).
    """
    args = list(args)
    args[-1] = 16  # a placeholder of the real offset's specialization (divisible by 16)
    try:
        compiled = kernel.warmup(*args, **constexprs, grid=(split,), **options)
    except TritonError as error:
        raise ClusterKernelError(f"{kernel.__name__} did not compile for thread-block clusters: {error}") from error
    compiled._init_handles()
    offset = -(-compiled.metadata.shared // 16) * 16 + 16
    shared = offset + exchange_bytes(split)
    key = (compiled.function, shared, split)
    if key not in _FIT:
        # Triton's occupancy helper assumes 128 threads a CTA: the 4-warp kernels of this module
        assert compiled.metadata.num_warps == 4
        utils = triton.runtime.driver.active.utils
        _FIT[key] = max(1, utils.cuOccupancyMaxActiveClusters(compiled.function, shared, split))
    args[-1] = offset
    device = torch.cuda.current_device()
    stream = triton.runtime.driver.active.get_current_stream(device)
    metadata = (compiled.metadata.num_warps, split, shared)  # Triton's launcher: cluster dimension = num_ctas
    compiled.run(min(clusters, _FIT[key]), 1, 1, stream, compiled.function, metadata, None, None, None, *args,
                 *constexprs.values())  # fmt: skip
