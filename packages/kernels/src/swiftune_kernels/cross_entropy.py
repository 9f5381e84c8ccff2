"""Cross-entropy over large vocabularies, with the logits gradient computed in the forward pass.

One program a row walks the vocabulary in blocks twice: an online max / log-sum-exp pass for the loss, then a pass that
writes the gradient (softmax - onehot, times the chain rule of scaling and soft-capping, times the row's share of the
reduction), optionally into the logits buffer itself. With 32 warps one program is resident per SM, the gradient pass
walks the blocks in reverse and eviction hints keep a row in L1 / L2 until its gradient pass: DRAM sees about one read
and one write of the logits while the ~130 rows in flight fit on chip and in L2 (33 MiB at V = 128k). At V = 256k (66
MiB), L1 and L2 together keep only about the last 256 KiB each SM read. On an H100, 44% of the re-reads miss; ncu shows
the kernel moving those bytes at DRAM's full rate (docs/BENCHMARKS.md, twelfth round). In the loss pass a block is
(lanes, lane_cols): by default one lane as wide as the block (one max and sum a block across all warps); narrower lanes
(e.g. one warp's loads wide) keep a running max and sum each and combine once a row (an option: on an H100 it was 3%
slower at V = 128k and 1% at 256k). Both passes double-buffer in registers. Variants that lost on the H100 and were
removed (see docs/BENCHMARKS.md): "split" kernels (a row's programs exchanging partial max / sum; last tried 2026-11-24
as two programs a row, 66-73% of copy bandwidth against 82-96%), keeping only each row's tail in L2, loading a row's
first block before its target, multi-stage shared-memory pipelines, and a pipelined kernel running one row's loss pass
beside the previous row's gradient pass. Tried on 2026-11-24 and not kept: a row's head held in registers (Triton
spills), per-block L1 / L2 hints (about 1%), leaner arithmetic (slower), a staggered first wave (no change: rows are at
random phases), and two-CTA clusters (triton 3.6 does not compile them).

Rows from ``CONFIG["cluster_min_cols"]`` (180000) to 262144 columns, without soft-capping, go to
cross_entropy_cluster.py on sm_90+ GPUs instead: each row split over the 16 CTAs of a thread-block cluster, read once
and held in registers (96-97% of copy bandwidth at V = 256k on an H100). ``programs_per_sm`` in :data:`CONFIG` still
makes the grid persistent (slower on the H100; the interpreter runs two programs to walk that loop). No float32 copy
of the logits is ever made; the backward pass only scales the stored gradient by grad_output, and
skips that (without a host sync) where grad_output is 1.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from swiftune_kernels.cluster_exchange import ClusterKernelError, cluster_launch_supported
from swiftune_kernels.cross_entropy_cluster import MAX_COLS as CLUSTER_MAX_COLS
from swiftune_kernels.cross_entropy_cluster import cross_entropy_cluster_forward
from swiftune_kernels.cross_entropy_math import combine_lanes, logits_gradient, online_lse_step, transform_logits
from swiftune_kernels.cross_entropy_reduce import (  # noqa: F401  (re-exported: fused_linear_cross_entropy uses them)
    check_loss_options,
    cross_entropy_backward,
    cross_entropy_weight,
    mean_loss,
    mean_weight,
    next_power_of_2,
    reduce_loss,
    sm_count,
)
from swiftune_kernels.dispatch import check_floating, check_same_device, use_triton
from swiftune_kernels.reference import cross_entropy as reference

# Default launch configuration (one line to switch to a sweep's winner). None: blocks of 64 KiB of logits, warps from
# the block, one lane a block, one program a row.
# "fused_mean": reduction "mean" computes its denominator in one small launch and the mean in another, instead of ~6
# small torch ops. "cluster": None uses the cluster kernel (cross_entropy_cluster.py) on sm_90+ GPUs for rows of
# "cluster_min_cols" to its maximum (262144) columns, True for every row it can take (through two launches where
# clusters cannot run), False never.
CONFIG = {
    "block_v": None,
    "num_warps": None,
    "lane_cols": None,
    "programs_per_sm": None,
    "grad_prefetch": True,
    "fused_mean": True,
    "cluster": None,
    "cluster_min_cols": 180000,
}


@triton.jit
def _cross_entropy_row(
    row,
    x_ptr,
    stride_xm,
    grad_ptr,
    stride_gm,
    target_ptr,
    stride_t,
    loss_ptr,
    weight_ptr,
    stride_w,
    n_cols,
    ignore_index,
    logit_scale,
    softcap,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    KEEP: tl.constexpr,
    DROP: tl.constexpr,
    GRAD_PREFETCH: tl.constexpr,
    LANE_COLS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    x_row = x_ptr + row * stride_xm
    g_row = grad_ptr + row * stride_gm
    offs = tl.arange(0, BLOCK_V)
    target = tl.load(target_ptr + row * stride_t)
    if target == ignore_index:
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < n_cols)
        tl.store(loss_ptr + row, 0.0)
    else:
        inv_softcap = 1.0 / softcap
        # An out-of-range target makes the row's loss NaN instead of reading outside the row.
        target_ok = (target >= 0) & (target < n_cols)
        x_t = tl.load(x_row + target, mask=target_ok, other=0.0).to(tl.float32)
        c_t = transform_logits(x_t, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
        c_t = tl.where(target_ok, c_t, float("nan"))
        target_col = tl.where(target_ok, target, -1).to(tl.int32)  # int32 compares against the block's columns

        # Loss pass over (lanes, LANE_COLS) blocks, a running max and sum per lane. Register double buffering: the
        # next block's load is in flight while this block is reduced, so one program per SM keeps DRAM busy. With
        # COMPUTE_GRAD the row is read again by the gradient pass: evict_last (Triton applies it to L1 and L2) keeps
        # as much of it as fits; the gradient pass re-reads and stores with evict_first, so that finished rows do
        # not push out rows still in flight.
        LANES: tl.constexpr = BLOCK_V // LANE_COLS
        lane_offs = tl.arange(0, LANES)[:, None] * LANE_COLS + tl.arange(0, LANE_COLS)[None, :]
        m = tl.full([LANES], float("-inf"), tl.float32)
        d = tl.zeros([LANES], tl.float32)
        x_next = tl.load(x_row + lane_offs, mask=lane_offs < n_cols, other=0.0, eviction_policy=KEEP)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + lane_offs
            x = x_next.to(tl.float32)
            x_next = tl.load(x_row + BLOCK_V + cols, mask=BLOCK_V + cols < n_cols, other=0.0, eviction_policy=KEEP)
            m, d = online_lse_step(x, cols < n_cols, m, d, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE,
                                   HAS_SOFTCAP)  # fmt: skip
        lse = combine_lanes(m, d)

        if COMPUTE_GRAD:
            w = tl.load(weight_ptr + row * stride_w).to(tl.float32)
            if HAS_LOGIT_SCALE:
                w = w * logit_scale
            num_blocks = tl.cdiv(n_cols, BLOCK_V)
            if GRAD_PREFETCH:
                last = (num_blocks - 1) * BLOCK_V + offs
                x_next = tl.load(x_row + last, mask=last < n_cols, other=0.0, eviction_policy=DROP)
            for i in range(0, num_blocks):
                cols = (num_blocks - 1 - i) * BLOCK_V + offs
                mask = cols < n_cols
                if GRAD_PREFETCH:
                    # the next (lower) block is read while this one is computed and stored: in place, blocks below
                    # the one being written are still logits
                    x = x_next.to(tl.float32)
                    below = cols - BLOCK_V
                    x_next = tl.load(x_row + below, mask=below >= 0, other=0.0, eviction_policy=DROP)
                else:
                    x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy=DROP).to(tl.float32)
                g = logits_gradient(x, cols, target_col, lse, w, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE,
                                    HAS_SOFTCAP)  # fmt: skip
                tl.store(g_row + cols, g, mask=mask, eviction_policy=DROP)
        tl.store(loss_ptr + row, lse - c_t)


@triton.jit
def _cross_entropy_fwd_kernel(
    x_ptr,
    stride_xm,
    grad_ptr,
    stride_gm,
    target_ptr,
    stride_t,
    loss_ptr,
    weight_ptr,
    stride_w,
    n_rows,
    n_cols,
    ignore_index,
    logit_scale,
    softcap,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    KEEP: tl.constexpr,
    DROP: tl.constexpr,
    GRAD_PREFETCH: tl.constexpr,
    LANE_COLS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Rows pid, pid + programs, ...; an int64 start makes row * stride int64 for (N, V) past 2**31 elements.
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        _cross_entropy_row(
            row, x_ptr, stride_xm, grad_ptr, stride_gm, target_ptr, stride_t, loss_ptr, weight_ptr, stride_w,
            n_cols, ignore_index, logit_scale, softcap,
            HAS_LOGIT_SCALE, HAS_SOFTCAP, COMPUTE_GRAD, KEEP, DROP, GRAD_PREFETCH, LANE_COLS, BLOCK_V,
        )  # fmt: skip


# the automatic choice stops using the cluster kernel after it failed to compile once in this process
_CLUSTER_FAILED: list[str] = []


def use_cluster_kernel(logits: torch.Tensor, choice: bool | None, softcap: float | None = None) -> bool:
    """Whether :func:`cross_entropy_forward` runs the cluster kernel on ``logits`` (N, V) for the setting ``choice``
    (see :data:`CONFIG`). Automatically only on GPUs with clusters, for rows from ``CONFIG["cluster_min_cols"]``
    columns (where the row kernel's second read misses L2), and without soft-capping (its arithmetic bounds both
    kernels there, and the row kernel's 32 warps an SM hide it better: 55% against 45% of copy bandwidth at V = 256k
    on an H100). Never for rows longer than the kernel holds."""
    n_cols = logits.shape[1]
    if choice is False or n_cols > CLUSTER_MAX_COLS:
        return False
    if choice:
        return True
    min_cols = CONFIG["cluster_min_cols"]
    if min_cols is None or n_cols < min_cols or softcap is not None or _CLUSTER_FAILED:
        return False
    return cluster_launch_supported(logits.device)


def cross_entropy_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    *,
    ignore_index: int = -100,
    logit_scale: float | None = None,
    softcap: float | None = None,
    grad: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    lane_cols: int | None = None,
    programs: int | None = None,
    grad_prefetch: bool | None = None,
    l2_hints: bool = True,
    cluster: bool | None = None,
) -> torch.Tensor:
    """Per-row loss (float32, 0 on ignored rows) of ``logits`` (N, V); writes d(sum_i weight_i * loss_i)/dlogits.

    ``weight`` holds 1 or N float32 row weights; ``grad`` (N, V), when given, receives the gradient and may be
    ``logits`` itself; ``loss`` (N,), when given, receives the loss. The launch options override :data:`CONFIG`
    (``programs``: the grid size itself); ``l2_hints=False`` drops the eviction hints. ``cluster`` chooses the
    kernel as ``CONFIG["cluster"]`` does (None: that setting); the other launch options apply to the row kernel.
    """
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (n_rows,)
    assert grad is None or (grad.shape == logits.shape and grad.stride(1) == 1)
    assert weight.numel() in (1, n_rows)
    if loss is None:
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    choice = CONFIG["cluster"] if cluster is None else cluster
    if use_cluster_kernel(logits, choice, softcap):
        try:
            return cross_entropy_cluster_forward(
                logits,
                targets,
                weight,
                loss,
                grad=grad,
                ignore_index=ignore_index,
                logit_scale=logit_scale,
                softcap=softcap,
                use_clusters=cluster_launch_supported(logits.device),
            )
        except ClusterKernelError as error:
            if choice:
                raise
            # automatic choice: the row kernel computes the same, only slower at these lengths
            _CLUSTER_FAILED.append(str(error))
            warnings.warn(f"{error}; cross_entropy uses its row kernel instead", RuntimeWarning, stacklevel=2)
    block_v = block_v or CONFIG["block_v"]
    if block_v is None:
        # 64 KiB of logits per block and 32 warps: 64 registers a thread (with the prefetched block), so one
        # program fills an SM's register file.
        block_v = 65536 // logits.element_size()
    block_v = min(next_power_of_2(n_cols), block_v)
    num_warps = num_warps or CONFIG["num_warps"] or max(4, min(32, block_v * logits.element_size() // 2048))
    # None: one lane a block (one max / sum across the warps of a block); else lanes this many columns wide
    lane_cols = min(block_v, lane_cols or CONFIG["lane_cols"] or block_v)
    if programs is None:
        per_sm = CONFIG["programs_per_sm"]
        if not logits.is_cuda:
            programs = 2  # CPU (interpreter): two programs, so that tests walk the persistent row loop
        elif per_sm is None:
            # One row a program: an H100 sweep of persistent grids of 66-132 programs at V = 128k was 6-70% slower
            # (one program an SM cannot pull full bandwidth alone when it also waits on its row's reductions).
            programs = n_rows
        else:
            programs = max(1, int(per_sm * sm_count(logits.device)))
    _cross_entropy_fwd_kernel[(max(1, min(programs, n_rows)),)](
        logits,
        logits.stride(0),
        logits if grad is None else grad,
        logits.stride(0) if grad is None else grad.stride(0),
        targets,
        targets.stride(0),
        loss,
        weight,
        0 if weight.numel() == 1 else weight.stride(0),
        n_rows,
        n_cols,
        ignore_index,
        1.0 if logit_scale is None else float(logit_scale),
        1.0 if softcap is None else float(softcap),
        HAS_LOGIT_SCALE=logit_scale is not None,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=grad is not None,
        KEEP="evict_last" if l2_hints and grad is not None else "",
        DROP="evict_first" if l2_hints else "",
        GRAD_PREFETCH=bool(CONFIG["grad_prefetch"] if grad_prefetch is None else grad_prefetch) and grad is not None,
        LANE_COLS=lane_cols,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return loss


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd for :func:`cross_entropy`: the gradient is computed in forward, backward only scales it."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, logit_scale, softcap, num_items_in_batch, inplace):
        x = logits if logits.stride(1) == 1 else logits.contiguous()
        fused_mean = CONFIG["fused_mean"] and reduction == "mean" and num_items_in_batch is None
        if fused_mean:
            weight, denominator = mean_weight(targets, ignore_index)
        else:
            weight, denominator = cross_entropy_weight(targets, ignore_index, reduction, num_items_in_batch)
        grad = None
        if ctx.needs_input_grad[0]:
            # a private contiguous copy can always take the gradient; the caller's logits only when allowed
            grad = x if (inplace or x is not logits) else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        loss = cross_entropy_forward(
            x,
            targets,
            weight,
            ignore_index=ignore_index,
            logit_scale=logit_scale,
            softcap=softcap,
            grad=grad,
        )
        if grad is logits:
            # The logits now hold the gradient: autograd nodes that saved them will refuse to run instead of
            # silently computing with the wrong values.
            torch.autograd.graph.increment_version(logits)
        ctx.grad_logits = None if grad is None else grad.detach()
        return mean_loss(loss, denominator) if fused_mean else reduce_loss(loss, reduction, denominator)

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad_logits
        if grad is None:
            raise RuntimeError(
                "cross_entropy keeps one logits gradient and scales it in place: it cannot run backward twice; "
                "call the loss again instead of retain_graph=True."
            )
        ctx.grad_logits = None
        cross_entropy_backward(grad, grad_output.to(torch.float32).reshape(-1))
        return grad, None, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float | None = None,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against class indices, never upcasting the logits to a float32 copy.

    Args:
        logits: (N, V) float32, float16 or bfloat16 scores over a vocabulary of V.
        targets: (N,) int64 class indices in [0, V), or ``ignore_index`` for rows that do not count.
        ignore_index: Target value whose rows get zero loss and zero gradient.
        reduction: "mean" (over non-ignored rows), "sum", or "none" (per-row losses, 0 on ignored rows).
        logit_scale: Multiply the logits by this first (Cohere, Granite).
        softcap: Soft-cap the (scaled) logits to ``softcap * tanh(logits / softcap)`` (Gemma 2).
        num_items_in_batch: With reduction "mean", divide the summed loss by this count (an int or a 0-d tensor:
            the number of target tokens over all gradient accumulation steps, as transformers passes it) instead
            of by the local count, so that accumulated gradients equal the full batch's.
        inplace: Write the logits gradient into ``logits`` during the forward pass, saving an (N, V) buffer. Only
            when nothing reads ``logits`` afterwards: their values are overwritten. An autograd node that saved
            them (e.g. ``logits = x.exp()``) then raises in backward instead of computing a wrong gradient.

    Returns:
        float32 loss: a scalar, or (N,) for reduction "none".
    """
    check_floating("logits", logits)
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be 2-D (tokens, vocab), got shape {tuple(logits.shape)}; flatten with "
            ".view(-1, logits.shape[-1])."
        )
    check_loss_options(targets, logits.shape[0], reduction, logit_scale, softcap, num_items_in_batch)
    check_same_device(logits=logits, targets=targets)
    if inplace and logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "inplace=True would overwrite a leaf tensor that requires grad; pass inplace=False, or logits "
            "computed by an op (e.g. lm_head(hidden))."
        )
    options = dict(ignore_index=ignore_index, reduction=reduction, logit_scale=logit_scale, softcap=softcap)
    if not use_triton(logits):
        return reference.cross_entropy(logits, targets, num_items_in_batch=num_items_in_batch, **options)
    return CrossEntropyFunction.apply(
        logits, targets, ignore_index, reduction, logit_scale, softcap, num_items_in_batch, inplace
    )
