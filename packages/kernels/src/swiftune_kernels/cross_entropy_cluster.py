"""Cross-entropy for long rows (V in the 200-260k range): each row split over the 16 CTAs of a thread-block cluster,
its logits read once and held in registers.

The row kernel (cross_entropy.py) reads a row twice, once for its log-sum-exp and once for the gradient, and counts
on L1 / L2 to serve the second read. At V = 256k, ~130 rows of 512 KiB are in flight, more than an H100's L2 holds:
44% of the second reads come from DRAM again, and the kernel runs at 82% of copy bandwidth.

Here CTA ``part`` of a cluster owns columns ``[part * part_cols, (part + 1) * part_cols)`` of every row its cluster
walks (the grid is persistent: as many clusters as fit). It loads its part once, computes the part's max and
log-sum-exp, exchanges that one float with its 15 partners (:func:`cluster_all_gather`) and writes the gradient from
the values still in registers. The next row's part is loaded before the exchange, so a CTA's loads stay in flight
while it waits. DRAM sees one read and one write of the logits (ncu: 3.98 GB read, 4.17 GB written at 8192 x 256000,
against the row kernel's 6.03 GB read). On an H100 this ran at 96-97% of copy bandwidth at V = 256000 and 262144
against the row kernel's 82%, and at 90-95% at V = 180-200k against 85% (docs/BENCHMARKS.md, fourteenth round).

With 16 parts of at most 16384 columns (4 warps, 128 columns a thread, up to 240 registers) rows of up to 262144
columns fit; the dispatch in cross_entropy.py uses this kernel from ``CONFIG["cluster_min_cols"]`` columns on, on
sm_90+ GPUs. Without soft-capping the kernel keeps exp(logit - part max) and rescales it once the row's log-sum-exp
is known (one exponential a logit); with soft-capping it keeps the capped logits, whose gradient needs them.

Under the interpreter (CI), and on GPUs without clusters when asked for, the exchange goes through global memory
across two launches: the first stores every part's log-sum-exp, the second reads them and writes the gradient. The
math of the parts is the same code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swiftune_kernels.cluster_exchange import cluster_all_gather, cluster_exchange_init, launch_in_clusters
from swiftune_kernels.cross_entropy_math import transform_logits
from swiftune_kernels.cross_entropy_reduce import next_power_of_2

SPLIT = 16  # CTAs a row: the largest cluster an H100 runs (non-portable size)
MAX_PART_COLS = 16384  # columns a CTA holds in registers (4 warps, 128 columns a thread)
MAX_COLS = SPLIT * MAX_PART_COLS
MIN_BLOCK = 1024

# exchanges: 0 = first of two launches (store each part's log-sum-exp), 1 = second of two (read them), 2 = cluster
_STORE_PARTS, _READ_PARTS, _CLUSTER = 0, 1, 2


@triton.jit
def _softcap_slope(c, inv_softcap):
    # d softcap*tanh(z/softcap) / dz at the capped value c: 1 - (c / softcap)^2
    t = c * inv_softcap
    return 1.0 - t * t


@triton.jit
def _cross_entropy_cluster_kernel(
    x_ptr,
    stride_xm,
    grad_ptr,
    stride_gm,
    target_ptr,
    stride_t,
    loss_ptr,
    weight_ptr,
    stride_w,
    parts_ptr,
    n_rows,
    n_cols,
    part_cols,
    ignore_index,
    logit_scale,
    softcap,
    exchange_offset,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    EXCHANGE: tl.constexpr,
):
    pid = tl.program_id(0)
    cluster = pid // SPLIT
    part = pid % SPLIT
    n_clusters = tl.num_programs(0) // SPLIT
    lo = part * part_cols
    hi = tl.minimum(lo + part_cols, n_cols)
    cols = lo + tl.arange(0, BLOCK)
    inv_softcap = 1.0 / softcap
    zero = 0
    if EXCHANGE == 2:
        zero = cluster_exchange_init(exchange_offset + 8 * SPLIT)
    # the mask's end is 0 past the last row (one scalar compare, not one a column)
    x_next = tl.load(x_ptr + cluster.to(tl.int64) * stride_xm + cols, mask=cols < tl.where(cluster < n_rows, hi, 0),
                     other=0.0, eviction_policy="evict_first")  # fmt: skip
    # an int64 row makes row * stride int64 for (N, V) past 2**31 elements
    for row in range(cluster.to(tl.int64), n_rows, n_clusters):
        x_row = x_ptr + row * stride_xm
        x = x_next
        # The next row's part goes out now, before this row's exchange, and is in flight while this CTA waits (in
        # place, this CTA writes only its own part of this row: the next row is still logits). Ignored rows are
        # read too: skipping them (targets read a row ahead) was slower at V = 180-200k on an H100 (83-88% of copy
        # bandwidth against 90-95%; 96.8 against 96.2% at 256k), an effect of the generated code, not of the bytes.
        nxt = row + n_clusters
        ahead = cols + zero * 16  # a 16-column multiple keeps the loads' alignment known
        x_next = tl.load(x_ptr + nxt * stride_xm + ahead, mask=ahead < tl.where(nxt < n_rows, hi, 0),
                         other=0.0, eviction_policy="evict_first")  # fmt: skip
        target = tl.load(target_ptr + row * stride_t)
        ignored = target == ignore_index
        target_ok = (target >= 0) & (target < n_cols)
        mine = (target >= lo) & (target < hi)
        # read before this CTA's gradient store overwrites it (in place)
        x_t = tl.load(x_row + target, mask=mine, other=0.0).to(tl.float32)
        c_t = transform_logits(x_t, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)

        c = transform_logits(x.to(tl.float32), logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
        c = tl.where(cols < hi, c, float("-inf"))
        m = tl.max(c, 0)
        m = tl.where(m == float("-inf"), 0.0, m)  # a part past the row's end, or all -inf: no NaN from -inf - -inf
        e = tl.exp(c - m)
        part_lse = m + tl.log(tl.sum(e, 0))
        if EXCHANGE == 0:
            tl.store(parts_ptr + row * SPLIT + part, part_lse)
        else:
            if EXCHANGE == 2:
                # zero: computes the gradient's addresses after the exchange (no registers held across it)
                parts, zero = cluster_all_gather(part_lse, part, (row - cluster) // n_clusters, exchange_offset, SPLIT)
            else:
                parts = tl.load(parts_ptr + row * SPLIT + tl.arange(0, SPLIT))
            top = tl.max(parts, 0)
            top = tl.where(top == float("-inf"), 0.0, top)
            lse = top + tl.log(tl.sum(tl.exp(parts - top), 0))
            if COMPUTE_GRAD:
                w = tl.load(weight_ptr + row * stride_w).to(tl.float32)
                if HAS_LOGIT_SCALE:
                    w = w * logit_scale
                w = tl.where(ignored, 0.0, w)
                if HAS_SOFTCAP:
                    g = tl.exp(c - lse) * _softcap_slope(c, inv_softcap) * w
                else:
                    g = e * (tl.exp(m - lse) * w)
                out = lo + zero * 16 + tl.arange(0, BLOCK)
                tl.store(grad_ptr + row * stride_gm + out, g, mask=out < hi, eviction_policy="evict_first")
                if mine:
                    # the target's -1, after a CTA barrier that orders it behind the block store of its column
                    tl.debug_barrier()
                    g_t = (tl.exp(c_t - lse) - 1.0) * w
                    if HAS_SOFTCAP:
                        g_t = g_t * _softcap_slope(c_t, inv_softcap)
                    tl.store(grad_ptr + row * stride_gm + target, g_t.to(grad_ptr.dtype.element_ty))
            # one CTA writes the loss: the target's owner, or part 0 for ignored rows and out-of-range targets (NaN)
            if mine | ((part == 0) & ~target_ok):
                row_loss = tl.where(target_ok, lse - c_t, float("nan"))
                tl.store(loss_ptr + row, tl.where(ignored, 0.0, row_loss))


def cluster_part_cols(n_cols: int) -> int:
    """Columns a CTA owns: a 16-column multiple (aligned vector loads), SPLIT of them covering the row."""
    return -(-n_cols // (16 * SPLIT)) * 16


def cross_entropy_cluster_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    loss: torch.Tensor,
    *,
    grad: torch.Tensor | None,
    ignore_index: int,
    logit_scale: float | None,
    softcap: float | None,
    use_clusters: bool,
    clusters: int | None = None,
) -> torch.Tensor:
    """:func:`swiftune_kernels.cross_entropy.cross_entropy_forward` with this module's kernel.

    ``use_clusters``: one launch with the cluster exchange (sm_90+ only), else the two-launch exchange through
    global memory. ``clusters``: the persistent grid's clusters (default: as many as fit; 2 under the
    interpreter, so that tests walk the row loop).
    """
    n_rows, n_cols = logits.shape
    if n_cols > MAX_COLS:
        raise ValueError(f"the cluster kernel takes rows of at most {MAX_COLS} columns, got {n_cols}")
    part_cols = cluster_part_cols(n_cols)
    # at least 1024 columns: a block spread over all 4 warps, whose reductions go through Triton's shared memory, so
    # that the kernel has the ``global_smem`` symbol the exchange addresses (tiny rows only; they are masked)
    block = max(MIN_BLOCK, next_power_of_2(part_cols))
    if clusters is None:
        clusters = n_rows if use_clusters else 2
    clusters = max(1, min(clusters, n_rows))
    # the two-launch exchange's per-part log-sum-exps; the cluster exchange never reads them (``loss`` stands in for
    # the pointer, with no allocation per call)
    parts = loss if use_clusters else torch.empty(n_rows * SPLIT, dtype=torch.float32, device=logits.device)
    args = [
        logits,
        logits.stride(0),
        logits if grad is None else grad,
        logits.stride(0) if grad is None else grad.stride(0),
        targets,
        targets.stride(0),
        loss,
        weight,
        0 if weight.numel() == 1 else weight.stride(0),
        parts,
        n_rows,
        n_cols,
        part_cols,
        ignore_index,
        1.0 if logit_scale is None else float(logit_scale),
        1.0 if softcap is None else float(softcap),
        16,  # the exchange area's offset in shared memory (cluster launches fill it in)
    ]
    constexprs = dict(
        HAS_LOGIT_SCALE=logit_scale is not None,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=grad is not None,
        SPLIT=SPLIT,
        BLOCK=block,
    )
    # 4 warps: 128 columns a thread at the largest parts; the registers they need (up to 240) still let two CTAs
    # share an SM, which the cluster scheduling needs to place 16-CTA clusters on every GPC.
    options = dict(num_warps=4, maxnreg=240)
    if use_clusters:
        launch_in_clusters(_cross_entropy_cluster_kernel, clusters, SPLIT, args, dict(constexprs, EXCHANGE=_CLUSTER),
                           **options)  # fmt: skip
        return loss
    for exchange in (_STORE_PARTS, _READ_PARTS):
        _cross_entropy_cluster_kernel[(clusters * SPLIT,)](*args, **constexprs, EXCHANGE=exchange, **options)
    return loss
