"""Probe: cross-entropy rows split over a thread-block cluster (``split`` CTAs a row), on sm_90+.

Each CTA walks its part of the row twice (loss pass, then gradient pass in reverse), like the library's row kernel,
but a part is 1/split of a row: with 16 parts and 8 CTAs of 4 warps an SM, about 66 rows are in flight and what an
SM must keep between its passes (8 x 32 KiB at V = 256k) fits L1 + L2. The parts exchange their log-sum-exps around a
hardware cluster barrier (``barrier.cluster`` through inline PTX): a cluster's CTAs are co-scheduled, so the wait
cannot deadlock. Triton 3.6 cannot compile ``num_ctas > 1``: the kernel is compiled for one CTA and launched with a
cluster dimension, through Triton's own launcher (its metadata's ``num_ctas``) or :func:`cluster_launch` (ctypes
``cuLaunchKernelEx``, with a scheduling policy and extra shared memory).

Options of :func:`split_forward` (JSON dicts on the command line): ``split``, ``block_v``, ``num_warps``,
``maxnreg``, ``keep`` (the loss pass's eviction hint), ``lane_cols``, ``prefetch_early`` / ``arrive_first`` (where
the gradient pass's first load goes around the barrier), ``policy`` (0 default, 1 spread, 2 load balancing) and
``exchange``: 2 global memory around one cluster barrier; 5 distributed shared memory (``st.shared::cluster`` into
every partner's slot, after Triton's own shared memory); 3 / 4 no cluster, arrivals counted with L2 atomics (by
program id / by ticket); 1 and 0 are timing probes with wrong values (barrier without partner values; neither).
``resident`` (``_ce_resident_kernel``): a CTA reads its part once and holds it in registers across the exchange
(``hold_bf16``: the 16-bit logits instead of exp(x - m)). ``clusters`` (``_ce_pipelined_kernel``): that many
persistent clusters (a fraction <= 1: of the most that fit), each CTA loading its part of the next row early
(``early`` 0 / 1 / 2: after the gradient store, between the barrier's arrive and wait, before the exchange) and keeping
``hold`` (0 exp(x - m) in float32, 1 the bf16 logits, 2 exp(x - m) in bf16). Its ``exchange`` 3 sends the parts'
log-sum-exps with ``st.async`` counted on mbarriers (swiftune_kernels.cluster_exchange, as the library kernel): no
cluster barrier, whose release waits for the prefetched loads; 1 / 0 are timing probes. The best on an H100
(docs/BENCHMARKS.md, fourteenth round) is the default variant below; swiftune_kernels/cross_entropy_cluster.py is
its library form.

    python packages/kernels/benchmarks/ce_cluster_probe.py --check --shapes 8192x256000
    python packages/kernels/benchmarks/ce_cluster_probe.py '{"split": 2}' '{"split": 16, "num_warps": 4, ...}'
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import sys

import torch
import triton
import triton.language as tl
from _timing import copy_bandwidth_gbps, time_ms
from bench_cross_entropy import make_inputs, pct_of_copy

from swiftune_kernels.cluster_exchange import cluster_all_gather, cluster_exchange_init, shared_load

ce = importlib.import_module("swiftune_kernels.cross_entropy")
math = importlib.import_module("swiftune_kernels.cross_entropy_math")


@triton.jit
def _barrier_step(token, PTX: tl.constexpr):
    # Every thread runs PTX (a barrier.cluster arrive and / or wait) and returns 0, opaque to the compiler: loads that
    # add it cannot move above the step. arrive.release makes this CTA's earlier stores visible to the cluster.
    return tl.inline_asm_elementwise(PTX + "\n\tmov.u32 $0, 0;", "=r,r", [token], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _cluster_sync(token):
    return _barrier_step(token, "barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;")


@triton.jit
def _cluster_arrive(token):
    # arrive only: the wait comes later, so that loads can be issued in between
    return _barrier_step(token, "barrier.cluster.arrive.release;")


@triton.jit
def _cluster_wait(token):
    return _barrier_step(token, "barrier.cluster.wait.acquire;")


@triton.jit
def _cluster_arrive_relaxed(token):
    return _barrier_step(token, "barrier.cluster.arrive.relaxed;")


@triton.jit
def _dsmem_put(ranks, offsets, values):
    # element j: store values[j] into the shared memory of the cluster's CTA ranks[j], at global_smem + offsets[j]
    return tl.inline_asm_elementwise(
        "{ .reg .b32 a, r; mov.u32 a, global_smem; add.u32 a, a, $2; mapa.shared::cluster.u32 r, a, $1; "
        "st.shared::cluster.f32 [r], $3; mov.u32 $0, 0; }",
        "=r,r,r,f",
        [ranks, offsets, values],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _ce_split_kernel(
    x_ptr,
    stride_xm,
    grad_ptr,
    stride_gm,
    target_ptr,
    loss_ptr,
    weight_ptr,
    scratch_ptr,
    count_ptr,
    n_cols,
    part_cols,
    ignore_index,
    exchange_off,
    SPLIT: tl.constexpr,
    PREFETCH_EARLY: tl.constexpr,
    LANE_COLS: tl.constexpr,
    ARRIVE_FIRST: tl.constexpr,
    EXCHANGE: tl.constexpr,
    KEEP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    if EXCHANGE == 4:
        # work by ticket: a CTA's partners have started before it or start after it, whatever the dispatch order
        pid = tl.atomic_add(count_ptr, 1, sem="relaxed")
    else:
        pid = tl.program_id(0)
    row = (pid // SPLIT).to(tl.int64)
    part = pid % SPLIT
    lo = part * part_cols
    hi = tl.minimum(lo + part_cols, n_cols)
    x_row = x_ptr + row * stride_xm
    g_row = grad_ptr + row * stride_gm
    offs = tl.arange(0, BLOCK_V)
    if EXCHANGE == 5:
        # a CTA may write into a partner's shared memory only once the partner runs: arrive now, wait before
        started = _cluster_arrive_relaxed(part)
    w = tl.load(weight_ptr).to(tl.float32)
    target = tl.load(target_ptr + row)
    LANES: tl.constexpr = BLOCK_V // LANE_COLS
    lane_offs = tl.arange(0, LANES)[:, None] * LANE_COLS + tl.arange(0, LANE_COLS)[None, :]
    if target == ignore_index:
        for start in range(lo, hi, BLOCK_V):
            cols = start + offs
            tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < hi)
        if part == 0:
            tl.store(loss_ptr + row, 0.0)
        if EXCHANGE == 5:
            _cluster_wait(started)
    else:
        mine = (target >= lo) & (target < hi)
        x_t = tl.load(x_row + target, mask=mine, other=0.0).to(tl.float32)
        target_col = tl.where(mine, target, -1).to(tl.int32)
        m = tl.full([LANES], float("-inf"), tl.float32)
        d = tl.zeros([LANES], tl.float32)
        x_next = tl.load(x_row + lo + lane_offs, mask=lo + lane_offs < hi, other=0.0, eviction_policy=KEEP)
        for start in range(lo, hi, BLOCK_V):
            cols = start + lane_offs
            x = x_next.to(tl.float32)
            nxt = BLOCK_V + cols
            x_next = tl.load(x_row + nxt, mask=nxt < hi, other=0.0, eviction_policy=KEEP)
            m, d = math.online_lse_step(x, cols < hi, m, d, 1.0, 1.0, 1.0, False, False)
        lse_part = math.combine_lanes(m, d)
        # also with EXCHANGE 5, which does not read it: without this store the kernel ran 2% slower (87.4 / 89.1-89.4%
        # of copy at 256k on one H100), an instruction-scheduling effect
        tl.store(scratch_ptr + pid, lse_part)
        num_blocks = tl.cdiv(hi - lo, BLOCK_V)
        if EXCHANGE == 0:
            # timing probe only (wrong values): no barrier, no partner values
            zero = 0
            last = lo + (num_blocks - 1) * BLOCK_V + offs
            x_next = tl.load(x_row + last, mask=last < hi, other=0.0, eviction_policy="evict_first")
        elif EXCHANGE == 5:
            # distributed shared memory: lse_part into every partner's slot [part], one cluster barrier
            ranks = tl.arange(0, SPLIT)
            zero = _cluster_wait(started)
            put = _dsmem_put(ranks, exchange_off + 4 * part + zero + ranks * 0, lse_part + ranks * 0.0)
            zero = _cluster_arrive(tl.max(put, 0))
            last = lo + (num_blocks - 1 + zero) * BLOCK_V + offs
            x_next = tl.load(x_row + last, mask=last < hi, other=0.0, eviction_policy="evict_first")
            zero = _cluster_wait(zero)
        elif EXCHANGE >= 3:
            # no cluster: count arrivals in L2 (acq_rel: the partner values stored before are visible to the last)
            arrived = tl.atomic_add(count_ptr + 1 + row, 1, sem="acq_rel") + 1
            last = lo + (num_blocks - 1) * BLOCK_V + offs
            x_next = tl.load(x_row + last, mask=last < hi, other=0.0, eviction_policy="evict_first")
            while arrived < SPLIT:
                arrived = tl.atomic_add(count_ptr + 1 + row, 0, sem="acquire")
            zero = arrived - SPLIT
        elif ARRIVE_FIRST:
            zero = _cluster_arrive(target.to(tl.int32))
            last = lo + (num_blocks - 1 + zero) * BLOCK_V + offs  # after the arrive; stays 16-byte aligned
            x_next = tl.load(x_row + last, mask=last < hi, other=0.0, eviction_policy="evict_first")
            zero = _cluster_wait(zero)
        else:
            if PREFETCH_EARLY:
                last = lo + (num_blocks - 1) * BLOCK_V + offs
                x_next = tl.load(x_row + last, mask=last < hi, other=0.0, eviction_policy="evict_first")
            zero = _cluster_sync(target.to(tl.int32))
        if not PREFETCH_EARLY and not ARRIVE_FIRST:
            last = lo + (num_blocks - 1 + zero) * BLOCK_V + offs  # after the arrive; stays 16-byte aligned
            x_next = tl.load(x_row + last, mask=last < hi, other=0.0, eviction_policy="evict_first")
        if EXCHANGE == 5:
            parts = shared_load(exchange_off + 4 * tl.arange(0, SPLIT) + zero)
            top = tl.max(parts, 0)
            lse = top + tl.log(tl.sum(tl.exp(parts - top), 0))
        elif EXCHANGE >= 2:
            parts = tl.load(scratch_ptr + (pid - part) + tl.arange(0, SPLIT) + zero, volatile=True)
            top = tl.max(parts, 0)
            lse = top + tl.log(tl.sum(tl.exp(parts - top), 0))
        else:
            lse = lse_part + zero  # timing probe only: wrong values
        for i in range(0, num_blocks):
            cols = lo + (num_blocks - 1 - i) * BLOCK_V + offs
            mask = cols < hi
            x = x_next.to(tl.float32)
            below = cols - BLOCK_V
            x_next = tl.load(x_row + below, mask=below >= lo, other=0.0, eviction_policy="evict_first")
            g = math.logits_gradient(x, cols, target_col, lse, w, 1.0, 1.0, 1.0, False, False)
            tl.store(g_row + cols, g, mask=mask, eviction_policy="evict_first")
        if mine:
            tl.store(loss_ptr + row, lse - x_t)


@triton.jit
def _opaque_bf16(x):
    # an identity on pairs of 16-bit values that the compiler cannot see through (nor move across other side effects)
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=2)


@triton.jit
def _ce_resident_kernel(
    x_ptr,
    stride_xm,
    grad_ptr,
    stride_gm,
    target_ptr,
    loss_ptr,
    weight_ptr,
    scratch_ptr,
    n_cols,
    part_cols,
    ignore_index,
    exchange_off,
    SPLIT: tl.constexpr,
    EXCHANGE: tl.constexpr,
    BLOCK: tl.constexpr,
    HOLD_BF16: tl.constexpr = False,
):
    # One read of the part, held in registers across the exchange: no second pass, so nothing needs L1 / L2 to keep a
    # row. exp(x - m) is computed once and rescaled by exp(m - lse) once the row's log-sum-exp is known.
    pid = tl.program_id(0)
    row = (pid // SPLIT).to(tl.int64)
    part = pid % SPLIT
    lo = part * part_cols
    hi = tl.minimum(lo + part_cols, n_cols)
    cols = lo + tl.arange(0, BLOCK)
    mask = cols < hi
    if EXCHANGE == 5:
        started = _cluster_arrive_relaxed(part)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=float("-inf"), eviction_policy="evict_first")
    target = tl.load(target_ptr + row)
    mine = (target >= lo) & (target < hi)
    x_t = tl.load(x_ptr + row * stride_xm + target, mask=mine, other=0.0).to(tl.float32)  # before the in-place store
    w = tl.load(weight_ptr).to(tl.float32)
    raw = x
    x = x.to(tl.float32)
    m = tl.max(x, 0)
    e = tl.exp(x - m)
    lse_part = m + tl.log(tl.sum(e, 0))
    if EXCHANGE == 5:
        ranks = tl.arange(0, SPLIT)
        zero = _cluster_wait(started)
        put = _dsmem_put(ranks, exchange_off + 4 * part + zero + ranks * 0, lse_part + ranks * 0.0)
        zero = _cluster_sync(tl.max(put, 0))
        parts = shared_load(exchange_off + 4 * tl.arange(0, SPLIT) + zero)
        top = tl.max(parts, 0)
        lse = top + tl.log(tl.sum(tl.exp(parts - top), 0))
    elif EXCHANGE == 2:
        tl.store(scratch_ptr + pid, lse_part)
        zero = _cluster_sync(target.to(tl.int32))
        parts = tl.load(scratch_ptr + (pid - part) + tl.arange(0, SPLIT) + zero, volatile=True)
        top = tl.max(parts, 0)
        lse = top + tl.log(tl.sum(tl.exp(parts - top), 0))
    else:
        zero = 0
        lse = lse_part  # timing probe only (wrong values): no barrier, no partner values
    ignored = target == ignore_index
    scale = tl.where(ignored, 0.0, w * tl.exp(m - lse))
    # the store's addresses and mask are computed after the exchange (through ``zero``), so that they do not hold
    # registers across it; the target's -1 is written alone, after a CTA barrier orders it behind the block store
    out = lo + zero * 8 + tl.arange(0, BLOCK)
    if HOLD_BF16:
        # hold the 16-bit logits (half the registers) and take the exponential again after the exchange
        e = tl.exp(_opaque_bf16(raw).to(tl.float32) - m)
    tl.store(grad_ptr + row * stride_gm + out, e * scale, mask=out < hi, eviction_policy="evict_first")
    if mine:
        tl.debug_barrier()
        tl.store(grad_ptr + row * stride_gm + target, ((x_t - m).exp() * scale - w).to(grad_ptr.dtype.element_ty))
    if mine | (ignored & (part == 0)):
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - x_t))


@triton.jit
def _ce_pipelined_kernel(
    x_ptr,
    stride_xm,
    grad_ptr,
    stride_gm,
    target_ptr,
    loss_ptr,
    weight_ptr,
    scratch_ptr,
    n_rows,
    n_cols,
    part_cols,
    ignore_index,
    exchange_off,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    EARLY: tl.constexpr,
    HOLD: tl.constexpr,
    EXCHANGE: tl.constexpr = 2,
):
    # Persistent clusters: cluster c walks rows c, c + clusters, ...; each CTA holds its part of a row in registers
    # and loads its part of the next row while it waits for its partners' log-sum-exps. EARLY: where the next row's
    # loads go (0 after the gradient store, 1 between the barrier's arrive and wait, 2 as soon as the current row's
    # values are in registers). HOLD: what is kept across the exchange (0 exp(x - m) in float32, 1 the bf16 logits,
    # whose exponential is taken again, 2 exp(x - m) rounded to bf16).
    pid = tl.program_id(0)
    cluster = pid // SPLIT
    part = pid % SPLIT
    n_clusters = tl.num_programs(0) // SPLIT
    lo = part * part_cols
    hi = tl.minimum(lo + part_cols, n_cols)
    cols = lo + tl.arange(0, BLOCK)
    w = tl.load(weight_ptr).to(tl.float32)
    x_next = tl.load(
        x_ptr + cluster.to(tl.int64) * stride_xm + cols,
        mask=(cols < hi) & (cluster < n_rows),
        other=float("-inf"),
        eviction_policy="evict_first",
    )
    zero = 0
    if EXCHANGE == 3:
        # slots [2][SPLIT] float32, then two mbarriers, after Triton's shared memory; rows alternate between them
        zero = cluster_exchange_init(exchange_off + 8 * SPLIT)
    for r in range(cluster, n_rows, n_clusters):
        row = r.to(tl.int64)
        nxt = r + n_clusters
        x_raw = x_next
        if EARLY == 2:
            # the current values are in registers (max below waits for them): the next row's loads go out now
            ahead = cols + zero * 8
            x_next = tl.load(x_ptr + nxt.to(tl.int64) * stride_xm + ahead, mask=(ahead < hi) & (nxt < n_rows),
                             other=float("-inf"), eviction_policy="evict_first")  # fmt: skip
        target = tl.load(target_ptr + row)
        mine = (target >= lo) & (target < hi)
        x_t = tl.load(x_ptr + row * stride_xm + target, mask=mine, other=0.0).to(tl.float32)
        m = tl.max(x_raw.to(tl.float32), 0)
        e = tl.exp(x_raw.to(tl.float32) - m)
        lse_part = m + tl.log(tl.sum(e, 0))
        if HOLD == 2:
            e = e.to(tl.bfloat16)
        tl.store(scratch_ptr + row * SPLIT + part, lse_part)
        if EXCHANGE == 3:
            # the library's exchange: st.async into every partner's slot, counted on its mbarrier
            parts, zero = cluster_all_gather(lse_part, part, (r - cluster) // n_clusters, exchange_off, SPLIT)
        elif EXCHANGE == 0:
            zero = 0  # timing probe only (wrong values): no barrier, each part its own log-sum-exp
        elif EXCHANGE == 1:
            zero = _cluster_wait(_cluster_arrive_relaxed(part))  # timing probe only: a barrier without release
        elif EARLY == 1:
            zero = _cluster_arrive(part)
            ahead = cols + zero * 8
            x_next = tl.load(x_ptr + nxt.to(tl.int64) * stride_xm + ahead, mask=(ahead < hi) & (nxt < n_rows),
                             other=float("-inf"), eviction_policy="evict_first")  # fmt: skip
            zero = _cluster_wait(zero)
        else:
            zero = _cluster_sync(part)
        if EXCHANGE == 3:
            top = tl.max(parts, 0)
            lse = top + tl.log(tl.sum(tl.exp(parts - top), 0))
        elif EXCHANGE == 2:
            parts = tl.load(scratch_ptr + row * SPLIT + tl.arange(0, SPLIT) + zero, volatile=True)
            top = tl.max(parts, 0)
            lse = top + tl.log(tl.sum(tl.exp(parts - top), 0))
        else:
            lse = lse_part
        ignored = target == ignore_index
        if HOLD == 1:
            scale = tl.where(ignored, 0.0, w)
            g = tl.exp(_opaque_bf16(x_raw).to(tl.float32) - lse) * scale
        else:
            scale = tl.where(ignored, 0.0, w * tl.exp(m - lse))
            g = e.to(tl.float32) * scale
        out = lo + zero * 8 + tl.arange(0, BLOCK)
        tl.store(grad_ptr + row * stride_gm + out, g, mask=out < hi, eviction_policy="evict_first")
        if mine:
            tl.debug_barrier()
            tl.store(grad_ptr + row * stride_gm + target, (tl.exp(x_t - lse) * w - w).to(grad_ptr.dtype.element_ty))
        if mine | (ignored & (part == 0)):
            tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - x_t))
        if EARLY == 0:
            ahead = cols + zero * 8
            x_next = tl.load(x_ptr + nxt.to(tl.int64) * stride_xm + ahead, mask=(ahead < hi) & (nxt < n_rows),
                             other=float("-inf"), eviction_policy="evict_first")  # fmt: skip


class _AttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("dims", ctypes.c_uint * 3), ("policy", ctypes.c_int)]


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttr)),
        ("num_attrs", ctypes.c_uint),
    ]


_LIBCUDA = None
_C_TYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "fp32": ctypes.c_float}


def cluster_launch(compiled, clusters, cluster_size, values, policy=1, extra_shared=0):
    """cuLaunchKernelEx of a Triton-compiled kernel with a cluster dimension and scheduling policy (0 default,
    1 spread, as Triton's launcher, 2 load balancing); ``values``: every parameter by name, constexprs included."""
    global _LIBCUDA
    if _LIBCUDA is None:
        _LIBCUDA = ctypes.CDLL("libcuda.so.1")
    assert compiled.metadata.global_scratch_size == 0 and compiled.metadata.profile_scratch_size == 0
    params = []
    for name, kind in compiled.src.signature.items():
        if kind == "constexpr":
            continue
        value = values[name]
        if kind.startswith("*"):
            params.append(ctypes.c_uint64(value.data_ptr()))
        else:
            params.append(_C_TYPES[kind](value))
    params += [ctypes.c_uint64(0), ctypes.c_uint64(0)]  # global and profile scratch (none)
    pointers = (ctypes.c_void_p * len(params))(*[ctypes.cast(ctypes.byref(p), ctypes.c_void_p) for p in params])
    attrs = (_LaunchAttr * 2)()
    attrs[0].id = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attrs[0].value.dims[0], attrs[0].value.dims[1], attrs[0].value.dims[2] = cluster_size, 1, 1
    attrs[1].id = 5  # CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE
    attrs[1].value.policy = policy
    config = _LaunchConfig()
    config.grid[0], config.grid[1], config.grid[2] = clusters * cluster_size, 1, 1
    config.block[0], config.block[1], config.block[2] = 32 * compiled.metadata.num_warps, 1, 1
    config.shared = compiled.metadata.shared + extra_shared
    config.stream = torch.cuda.current_stream().cuda_stream
    config.attrs = attrs
    config.num_attrs = 2
    function = ctypes.c_void_p(compiled.function)
    if cluster_size > 8:
        assert _LIBCUDA.cuFuncSetAttribute(function, 14, 1) == 0  # NON_PORTABLE_CLUSTER_SIZE_ALLOWED
    status = _LIBCUDA.cuLaunchKernelEx(ctypes.byref(config), function, pointers, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {status}")


# the best variant on an H100 at V = 256k (98.3% of copy bandwidth; the row kernel: 82.1%; the thirteenth round's best,
# 16 streaming CTAs a row through a cluster barrier, {"split": 16, "num_warps": 4, "block_v": 4096, "maxnreg": 64,
# "arrive_first": True, "exchange": 5, "keep": ""}: 89.7-89.9%)
BEST = {"clusters": 1, "split": 16, "num_warps": 4, "maxnreg": 240, "early": 2, "hold": 0, "exchange": 3}

_COMPILED = {}


def split_forward(
    logits,
    targets,
    weight,
    grad,
    loss,
    split=2,
    block_v=32768,
    num_warps=32,
    prefetch_early=True,
    maxnreg=None,
    lane_cols=None,
    arrive_first=False,
    exchange=2,
    cluster=True,
    policy=None,
    balanced=False,
    keep="evict_last",
    resident=False,
    hold_bf16=False,
    clusters=None,
    early=1,
    hold=0,
):
    """Loss rows into ``loss`` and the gradient into ``grad`` with ``split`` CTAs (one cluster) a row."""
    n_rows, n_cols = logits.shape
    if clusters:
        options = (split, num_warps, maxnreg, clusters, early, hold, exchange, policy)
        return pipelined_forward(logits, targets, weight, grad, loss, *options)
    if resident:
        options = (split, num_warps, maxnreg, exchange, policy, hold_bf16)
        return resident_forward(logits, targets, weight, grad, loss, *options)
    # balanced: equal parts (16-column multiples), each ending in a partial block; else whole blocks a part
    part_cols = triton.cdiv(triton.cdiv(n_cols, split), 16 if balanced else block_v) * (16 if balanced else block_v)
    assert (split - 1) * part_cols < n_cols, "every part needs columns"
    scratch = torch.empty(n_rows * split, dtype=torch.float32, device=logits.device)
    # exchanges 3 / 4 count arrivals (after a ticket): only they need a zeroed buffer, the memset launch is timed too
    counted = exchange in (3, 4)
    zeroed = torch.zeros if counted else torch.empty
    counts = zeroed(n_rows + 1 if counted else 1, dtype=torch.int32, device=logits.device)
    args = [logits, logits.stride(0), grad, grad.stride(0), targets, loss, weight, scratch, counts, n_cols, part_cols,
            -100, 16]  # fmt: skip
    constexprs = dict(SPLIT=split, PREFETCH_EARLY=prefetch_early, LANE_COLS=lane_cols or block_v,
                      ARRIVE_FIRST=arrive_first, EXCHANGE=exchange, KEEP=keep, BLOCK_V=block_v)  # fmt: skip
    key = (split, block_v, num_warps, prefetch_early, maxnreg, lane_cols, arrive_first, exchange, keep)
    if key not in _COMPILED:
        compiled = _ce_split_kernel.warmup(*args, **constexprs, grid=(n_rows * split,), num_warps=num_warps,
                                           maxnreg=maxnreg)  # fmt: skip
        compiled._init_handles()
        print(f"compiled {key}: {compiled.n_regs} registers, {compiled.n_spills} spills", flush=True)
        _COMPILED[key] = compiled
    compiled = _COMPILED[key]
    stream = torch.cuda.current_stream().cuda_stream
    if exchange == 5:
        # the exchange slots follow Triton's own shared memory
        args[-1] = -(-compiled.metadata.shared // 16) * 16
        policy = 1 if policy is None else policy
    if policy is not None:
        names = list(compiled.src.signature)
        values = dict(zip(names, args + list(constexprs.values()), strict=True))
        cluster_launch(compiled, n_rows, split, values, policy, extra_shared=args[-1] - compiled.metadata.shared + 64)
        return
    # cluster=False (timing probes with exchange=0 only): the same CTAs without a cluster dimension
    ctas = split if cluster and exchange < 3 else 1
    meta = (compiled.metadata.num_warps, ctas, compiled.metadata.shared)
    compiled.run(n_rows * split // ctas, 1, 1, stream, compiled.function, meta, None, None, None, *args,
                 *constexprs.values())  # fmt: skip


def resident_forward(logits, targets, weight, grad, loss, split, num_warps, maxnreg, exchange, policy, hold_bf16):
    """:func:`split_forward` with ``resident``: a CTA reads its part once, into registers (``_ce_resident_kernel``)."""
    n_rows, n_cols = logits.shape
    part_cols = triton.cdiv(triton.cdiv(n_cols, split), 8) * 8  # 16-byte aligned parts
    assert (split - 1) * part_cols < n_cols, "every part needs columns"
    scratch = torch.empty(n_rows * split, dtype=torch.float32, device=logits.device)
    args = [logits, logits.stride(0), grad, grad.stride(0), targets, loss, weight, scratch, n_cols, part_cols, -100, 16]
    constexprs = dict(SPLIT=split, EXCHANGE=exchange, BLOCK=triton.next_power_of_2(part_cols), HOLD_BF16=hold_bf16)
    key = ("resident", split, num_warps, maxnreg, exchange, constexprs["BLOCK"], hold_bf16)
    if key not in _COMPILED:
        compiled = _ce_resident_kernel.warmup(*args, **constexprs, grid=(n_rows * split,), num_warps=num_warps,
                                              maxnreg=maxnreg)  # fmt: skip
        compiled._init_handles()
        print(f"compiled {key}: {compiled.n_regs} registers, {compiled.n_spills} spills", flush=True)
        _COMPILED[key] = compiled
    compiled = _COMPILED[key]
    if exchange == 5:
        args[-1] = -(-compiled.metadata.shared // 16) * 16
        policy = 1 if policy is None else policy
    if policy is not None or exchange == 5:
        names = list(compiled.src.signature)
        values = dict(zip(names, args + list(constexprs.values()), strict=True))
        cluster_launch(compiled, n_rows, split, values, policy, extra_shared=args[-1] - compiled.metadata.shared + 64)
        return
    meta = (compiled.metadata.num_warps, split if exchange else 1, compiled.metadata.shared)
    ctas = split if exchange else 1
    stream = torch.cuda.current_stream().cuda_stream
    compiled.run(n_rows * split // ctas, 1, 1, stream, compiled.function, meta, None, None, None, *args,
                 *constexprs.values())  # fmt: skip


def max_active_clusters(compiled, cluster_size):
    """cuOccupancyMaxActiveClusters for the compiled kernel's real block size and shared memory."""
    global _LIBCUDA
    if _LIBCUDA is None:
        _LIBCUDA = ctypes.CDLL("libcuda.so.1")
    attrs = (_LaunchAttr * 1)()
    attrs[0].id = 4
    attrs[0].value.dims[0], attrs[0].value.dims[1], attrs[0].value.dims[2] = cluster_size, 1, 1
    config = _LaunchConfig()
    config.grid[0], config.grid[1], config.grid[2] = cluster_size, 1, 1
    config.block[0], config.block[1], config.block[2] = 32 * compiled.metadata.num_warps, 1, 1
    config.shared = compiled.metadata.shared
    config.attrs = attrs
    config.num_attrs = 1
    function = ctypes.c_void_p(compiled.function)
    if cluster_size > 8:
        assert _LIBCUDA.cuFuncSetAttribute(function, 14, 1) == 0
    count = ctypes.c_int(-1)
    status = _LIBCUDA.cuOccupancyMaxActiveClusters(ctypes.byref(count), function, ctypes.byref(config))
    assert status == 0, status
    return count.value


def pipelined_forward(
    logits, targets, weight, grad, loss, split, num_warps, maxnreg, clusters, early, hold, exchange, policy
):
    """:func:`split_forward` with ``clusters``: that many persistent clusters (0 < clusters <= 1 means that fraction
    of the most that fit at once), each CTA holding a part in registers and loading the next row's part early."""
    n_rows, n_cols = logits.shape
    part_cols = triton.cdiv(triton.cdiv(n_cols, split), 8) * 8
    assert (split - 1) * part_cols < n_cols, "every part needs columns"
    scratch = torch.empty(n_rows * split, dtype=torch.float32, device=logits.device)
    args = [logits, logits.stride(0), grad, grad.stride(0), targets, loss, weight, scratch, n_rows, n_cols, part_cols,
            -100, 16]  # fmt: skip
    constexprs = dict(SPLIT=split, BLOCK=triton.next_power_of_2(part_cols), EARLY=int(early), HOLD=hold,
                      EXCHANGE=exchange)  # fmt: skip
    key = ("pipelined", split, num_warps, maxnreg, constexprs["BLOCK"], int(early), hold, exchange)
    if key not in _COMPILED:
        compiled = _ce_pipelined_kernel.warmup(*args, **constexprs, grid=(split,), num_warps=num_warps,
                                               maxnreg=maxnreg)  # fmt: skip
        compiled._init_handles()
        fit = max_active_clusters(compiled, split)
        print(
            f"compiled {key}: {compiled.n_regs} registers, {compiled.n_spills} spills, {fit} clusters fit", flush=True
        )
        _COMPILED[key] = compiled
        _COMPILED[key + ("fit",)] = fit
    compiled = _COMPILED[key]
    if clusters <= 1:
        clusters = max(1, int(_COMPILED[key + ("fit",)] * clusters))
    clusters = min(clusters, n_rows)
    names = list(compiled.src.signature)
    extra = 0
    if exchange == 3:
        args[-1] = -(-compiled.metadata.shared // 16) * 16
        extra = args[-1] - compiled.metadata.shared + 8 * split + 16
    values = dict(zip(names, args + list(constexprs.values()), strict=True))
    cluster_launch(compiled, clusters, split, values, 1 if policy is None else policy, extra_shared=extra)


def check(split_options):
    """Loss and gradient of each variant against float64 torch on a few rows, incl. an ignored row."""
    device = torch.device("cuda")
    for vocab in (128256, 256000):  # the probe keeps one binary a variant: 16-aligned rows only
        logits, targets = make_inputs(37, vocab, torch.bfloat16, device)
        targets[3] = -100
        targets[5] = vocab - 1
        targets[6] = 0
        x64 = logits.double().requires_grad_(True)
        ref = torch.nn.functional.cross_entropy(x64, targets, reduction="sum", ignore_index=-100)
        ref.backward()
        ref_loss = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none", ignore_index=-100)
        for options in split_options:
            split, block_v = options.get("split", 2), options.get("block_v", 32768)
            block_v = (
                16 if options.get("balanced") else 8 if options.get("resident") or options.get("clusters") else block_v
            )
            if options.get("exchange", 2) < 2:
                continue  # timing probes: wrong values by design
            if (split - 1) * triton.cdiv(triton.cdiv(vocab, split), block_v) * block_v >= vocab:
                continue
            grad = torch.empty_like(logits)
            loss = torch.full((37,), float("nan"), device=device)
            split_forward(logits, targets, torch.ones(1, device=device), grad, loss, **options)
            torch.cuda.synchronize()
            loss_err = (loss.double() - ref_loss).abs().max().item()
            grad_err = (grad.double() - x64.grad).abs().max().item()
            ok = loss_err < 1e-3 and grad_err < 1e-2 * x64.grad.abs().max().item()
            print(f"check V={vocab} {json.dumps(options)}: loss err {loss_err:.2e}, grad err {grad_err:.2e}"
                  f" {'ok' if ok else 'FAIL'}", flush=True)  # fmt: skip
            if not ok:
                sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="JSON dicts of split_forward options")
    parser.add_argument("--shapes", default="8192x128256,8192x256000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--once", action="store_true", help="run each variant twice untimed (for ncu)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ce_cluster_probe.py needs a CUDA GPU (sm_90 or later).")
    variants = [json.loads(v) for v in args.variants] or [dict(BEST)]
    if args.check:
        check(variants)
    device = torch.device("cuda")
    copy = None if args.once else copy_bandwidth_gbps(device, True, False)
    table = []
    for shape in args.shapes.split(","):
        rows, vocab = (int(n) for n in shape.split("x"))
        logits, targets = make_inputs(rows, vocab, torch.bfloat16, device)
        weight = torch.ones(1, device=device)
        loss = torch.empty(rows, device=device)
        inputs = (logits, targets, weight, loss)
        runs = {"library default": lambda a=inputs: ce.cross_entropy_forward(*a[:3], grad=a[0], loss=a[3])}
        for options in variants:
            runs[json.dumps(options)] = lambda o=options, a=inputs: split_forward(*a[:3], a[0], a[3], **o)
        times = {}
        for _ in range(1 if args.once else args.repeats):
            for name, fn in runs.items():
                fn()
                if args.once:
                    fn()
                    torch.cuda.synchronize()
                    continue
                times.setdefault(name, []).append(time_ms(fn, True, False)[0])
        for name, measured in times.items():
            pct = pct_of_copy(rows, vocab, min(measured), copy)
            table.append((f"{rows}x{vocab}", name, [round(t, 4) for t in measured], pct))
        del logits
        torch.cuda.empty_cache()
    if table:
        print(f"\ncopy bandwidth {copy:.0f} GB/s")
        for shape, name, ms, pct in table:
            print(f"{shape:<12} {name:<58} {str(ms):<28} {pct:.1f}%")


if __name__ == "__main__":
    main()
