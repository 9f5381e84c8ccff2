"""Cross-entropy over large vocabularies, with the logits gradient computed in the forward pass.

One program a row walks the vocabulary in blocks twice: an online max / log-sum-exp pass for the loss, then a pass
that writes the gradient (softmax - onehot, times the chain rule of scaling and soft-capping, times the row's share of
the reduction), optionally into the logits buffer itself. With 32 warps one program is resident per SM, the gradient
pass walks the blocks in reverse and eviction hints keep a row in L2 until its gradient pass: DRAM sees about one
read and one write of the logits while the ~130 rows in flight fit L2 (33 MiB at V = 128k; H100: 50 MiB); at
V = 256k (66 MiB) about half of each re-read misses. Sweep variants in :data:`CONFIG` (benchmarks/sweep_kernels.py):
``l2_keep_kib`` keeps only each row's last KiB in L2 (read first by the reversed gradient pass; the head is streamed
with evict_first), so that the kept tails of all rows in flight fit instead of thrashing; ``early_load`` and
``grad_prefetch`` hide latencies that idle an SM running one program (the first block is requested before the
target, the gradient pass double-buffers); ``programs_per_sm`` makes the grid persistent. A "split" kernel (a row's
programs exchanging partial max / sum) lost to this one at every chunk size in the 2026-11-23 H100 sweep (44-76% of
copy bandwidth against 80-90%) and was removed. No float32 copy of the logits is ever made; the backward pass only
scales the stored gradient by grad_output, and skips that (without a host sync) where grad_output is 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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

# Default launch configuration (one line to switch to a sweep's winner; the variants: see the module docstring).
# None: block_v 64 KiB of logits, warps from it, all of a row kept in L2, one program a row. "fused_mean": reduction
# "mean" computes its denominator in one small launch and the mean in another, instead of ~6 small torch ops.
CONFIG = {
    "block_v": None,
    "num_warps": None,
    "l2_keep_kib": None,
    "programs_per_sm": None,
    "early_load": False,
    "grad_prefetch": True,
    "fused_mean": True,
}


@triton.jit
def _transform(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    if HAS_LOGIT_SCALE:
        x = x * logit_scale
    if HAS_SOFTCAP:
        # tanh(z) = 2 * sigmoid(2z) - 1: tl.math.tanh is missing in older Triton and in the interpreter.
        x = softcap * (2.0 * tl.sigmoid(2.0 * x * inv_softcap) - 1.0)
    return x


@triton.jit
def _online_lse_step(x, mask, m, d, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP):
    c = _transform(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
    c = tl.where(mask, c, float("-inf"))
    m_new = tl.maximum(m, tl.max(c, 0))
    # Keeps exp(-inf - -inf) = NaN away when a whole block is -inf (masked vocabulary entries).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(c - m_safe), 0)
    return m_new, d


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
    keep_from,
    ignore_index,
    logit_scale,
    softcap,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HEAD: tl.constexpr,
    KEEP: tl.constexpr,
    DROP: tl.constexpr,
    HAS_HEAD: tl.constexpr,
    EARLY: tl.constexpr,
    GRAD_PREFETCH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    x_row = x_ptr + row * stride_xm
    g_row = grad_ptr + row * stride_gm
    offs = tl.arange(0, BLOCK_V)
    if EARLY:
        # The row's first block is requested before the target: its latency overlaps the target's (and the
        # target logit's) instead of following them; an ignored row just drops it.
        if HAS_HEAD:
            x_first = tl.load(x_row + offs, mask=offs < n_cols, other=0.0, eviction_policy=HEAD)
        else:
            x_first = tl.load(x_row + offs, mask=offs < n_cols, other=0.0, eviction_policy=KEEP)
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
        c_t = _transform(x_t, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
        c_t = tl.where(target_ok, c_t, float("nan"))
        target_col = tl.where(target_ok, target, -1).to(tl.int32)  # int32 compares against the block's columns

        m = float("-inf")
        d = 0.0
        # Register double buffering: the next block's load is in flight while this block's max and sum reductions
        # (which synchronize the program's warps) run, so one program per SM still keeps DRAM busy.
        # With COMPUTE_GRAD the row is read again by the gradient pass: the head [0, keep_from) is streamed (HEAD:
        # evict_first when only a tail is kept), the tail is kept (evict_last); the gradient pass re-reads and
        # stores with evict_first, so that finished rows do not push out rows still in flight.
        if EARLY and HAS_HEAD:
            x_next = x_first
        else:
            x_next = tl.load(x_row + offs, mask=offs < keep_from, other=0.0, eviction_policy=HEAD)
        for start in range(0, keep_from, BLOCK_V):
            cols = start + offs
            x = x_next.to(tl.float32)
            x_next = tl.load(x_row + BLOCK_V + cols, mask=BLOCK_V + cols < keep_from, other=0.0, eviction_policy=HEAD)
            m, d = _online_lse_step(x, cols < keep_from, m, d, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE,
                                    HAS_SOFTCAP)  # fmt: skip
        if EARLY and not HAS_HEAD:
            x_next = x_first
        else:
            x_next = tl.load(x_row + keep_from + offs, mask=keep_from + offs < n_cols, other=0.0, eviction_policy=KEEP)
        for start in range(keep_from, n_cols, BLOCK_V):
            cols = start + offs
            x = x_next.to(tl.float32)
            x_next = tl.load(x_row + BLOCK_V + cols, mask=BLOCK_V + cols < n_cols, other=0.0, eviction_policy=KEEP)
            m, d = _online_lse_step(x, cols < n_cols, m, d, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE,
                                    HAS_SOFTCAP)  # fmt: skip
        lse = m + tl.log(d)

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
                c = _transform(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
                p = tl.exp(c - lse)
                g = tl.where(cols == target_col, p - 1.0, p)
                if HAS_SOFTCAP:
                    t = c * inv_softcap
                    g = g * (1.0 - t * t)
                tl.store(g_row + cols, g * w, mask=mask, eviction_policy=DROP)
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
    keep_from,
    ignore_index,
    logit_scale,
    softcap,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HEAD: tl.constexpr,
    KEEP: tl.constexpr,
    DROP: tl.constexpr,
    HAS_HEAD: tl.constexpr,
    EARLY: tl.constexpr,
    GRAD_PREFETCH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Rows pid, pid + programs, ...; an int64 start makes row * stride int64 for (N, V) past 2**31 elements.
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        _cross_entropy_row(
            row, x_ptr, stride_xm, grad_ptr, stride_gm, target_ptr, stride_t, loss_ptr, weight_ptr, stride_w,
            n_cols, keep_from, ignore_index, logit_scale, softcap,
            HAS_LOGIT_SCALE, HAS_SOFTCAP, COMPUTE_GRAD, HEAD, KEEP, DROP, HAS_HEAD, EARLY, GRAD_PREFETCH, BLOCK_V,
        )  # fmt: skip


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
    l2_hints: bool = True,
    l2_keep_kib: float | None = None,
    programs: int | None = None,
    early_load: bool | None = None,
    grad_prefetch: bool | None = None,
) -> torch.Tensor:
    """Per-row loss (float32, 0 on ignored rows) of ``logits`` (N, V); writes d(sum_i weight_i * loss_i)/dlogits.

    ``weight`` holds 1 or N float32 row weights; ``grad`` (N, V), when given, receives the gradient and may be
    ``logits`` itself; ``loss`` (N,), when given, receives the loss. The launch options override :data:`CONFIG`
    (``programs``: the grid size itself); ``l2_hints=False`` drops the eviction hints.
    """
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (n_rows,)
    assert grad is None or (grad.shape == logits.shape and grad.stride(1) == 1)
    assert weight.numel() in (1, n_rows)
    if loss is None:
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    block_v = block_v or CONFIG["block_v"]
    if block_v is None:
        # 64 KiB of logits per block and 32 warps: 64 registers a thread (with the prefetched block), so one
        # program fills an SM's register file.
        block_v = 65536 // logits.element_size()
    block_v = min(next_power_of_2(n_cols), block_v)
    num_warps = num_warps or CONFIG["num_warps"] or max(4, min(32, block_v * logits.element_size() // 2048))
    l2_keep_kib = CONFIG["l2_keep_kib"] if l2_keep_kib is None else l2_keep_kib
    keep_from = 0
    if l2_keep_kib is not None and grad is not None and l2_hints:
        keep_cols = int(l2_keep_kib * 1024) // logits.element_size()
        # the head in whole blocks, so that the gradient pass's (reversed) blocks meet the kept tail first
        keep_from = max(0, n_cols - keep_cols) // block_v * block_v
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
        keep_from,
        ignore_index,
        1.0 if logit_scale is None else float(logit_scale),
        1.0 if softcap is None else float(softcap),
        HAS_LOGIT_SCALE=logit_scale is not None,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=grad is not None,
        HEAD="evict_first" if keep_from > 0 else "",
        KEEP="evict_last" if l2_hints and grad is not None else "",
        DROP="evict_first" if l2_hints else "",
        HAS_HEAD=keep_from > 0,
        EARLY=bool(CONFIG["early_load"] if early_load is None else early_load),
        GRAD_PREFETCH=bool(CONFIG["grad_prefetch"] if grad_prefetch is None else grad_prefetch) and grad is not None,
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
