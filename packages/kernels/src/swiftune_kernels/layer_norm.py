"""LayerNorm with or without bias: fused Triton forward and backward.

Same layout as rms_norm.py (whose row helpers it shares): BLOCK_M rows per program with the row whole in
registers, float32 statistics, one float32 mean and rstd saved per row, and weight/bias gradients reduced in
two stages (per-program float32 partial rows, then one small summing kernel) only for the parameters that require them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swiftune_kernels.dispatch import check_floating, check_same_device, use_triton
from swiftune_kernels.reference.layer_norm import layer_norm as layer_norm_reference
from swiftune_kernels.rms_norm import (
    as_rows,
    row_block_settings,
    sum_partials,
    weight_grad_grid,
    weight_grad_launch_options,
)


@triton.jit
def _layer_norm_fwd_kernel(
    y_ptr,
    x_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    stride_ym,
    stride_xm,
    n_rows,
    n_cols,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    # Two passes over registers (mean, then centred squares) avoid the cancellation of E[x^2] - E[x]^2.
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    y = centred * rstd[:, None] * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], y, mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _load_rows(x_ptr, dy_ptr, mean_ptr, rstd_ptr, rows, row_end, cols, col_mask, stride_xm, stride_dym):
    row_mask = rows < row_end
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    # Kept in the storage dtype: prefetched blocks then hold half the registers (bf16) until used.
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
    mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    return x, dy, mean, rstd


@triton.jit
def _layer_norm_bwd_kernel(
    dx_ptr,
    dw_partial_ptr,
    db_partial_ptr,
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    stride_dxm,
    stride_dym,
    stride_xm,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    if PREFETCH:
        x_in, dy_in, mean, rstd = _load_rows(
            x_ptr,
            dy_ptr,
            mean_ptr,
            rstd_ptr,
            row_start + tl.arange(0, BLOCK_M),
            row_end,
            cols,
            col_mask,
            stride_xm,
            stride_dym,
        )
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        if PREFETCH:
            # The next block's loads go out before this block's math, keeping two blocks in flight per program.
            x_next, dy_next, mean_next, rstd_next = _load_rows(
                x_ptr, dy_ptr, mean_ptr, rstd_ptr, rows + BLOCK_M, row_end, cols, col_mask, stride_xm, stride_dym
            )
        else:
            x_in, dy_in, mean, rstd = _load_rows(
                x_ptr, dy_ptr, mean_ptr, rstd_ptr, rows, row_end, cols, col_mask, stride_xm, stride_dym
            )
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x, dy = x_in.to(tl.float32), dy_in.to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dxhat = dy * w[None, :]
        mean_dxhat = tl.sum(dxhat, axis=1) / n_cols
        mean_dot = tl.sum(dxhat * xhat, axis=1) / n_cols
        dx = rstd[:, None] * (dxhat - mean_dxhat[:, None] - xhat * mean_dot[:, None])
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm + cols[None, :], dx, mask=mask)
        if HAS_DW:
            dw_acc += dy * xhat
        if HAS_DB:
            db_acc += dy
        if PREFETCH:
            x_in, dy_in, mean, rstd = x_next, dy_next, mean_next, rstd_next

    if HAS_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_DB:
        tl.store(db_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_floating("x", x)
    check_floating("weight", weight)
    if bias is not None:
        check_floating("bias", bias)
    check_same_device(x=x, weight=weight, bias=bias)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden dimension to normalise), got a scalar.")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and (param.dim() != 1 or param.shape[0] != x.shape[-1]):
            raise ValueError(
                f"{name} must have shape ({x.shape[-1]},) to match the last dimension of x {tuple(x.shape)}, "
                f"got {tuple(param.shape)}."
            )


def layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on (rows, hidden) ``x`` with unit column stride; return (y, mean, rstd)."""
    assert x.dim() == 2 and (x.stride(-1) == 1 or x.shape[-1] == 1), "call with as_rows(x)"
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, mean, rstd
    block_m, block_n, num_warps = row_block_settings(n_cols)
    weight = weight.contiguous()
    _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        y,
        x,
        weight,
        weight if bias is None else bias.contiguous(),  # never read without HAS_BIAS
        mean,
        rstd,
        y.stride(0),
        x.stride(0),
        n_rows,
        n_cols,
        eps,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, mean, rstd


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward on (rows, hidden) tensors; return (dx, dweight or None, dbias or None)."""
    assert dy.shape == x.shape, "dy and x must both be as_rows() views of one shape"
    assert bias is not None or not compute_db
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return (
            dx,
            torch.zeros_like(weight) if compute_dw else None,
            torch.zeros_like(bias) if compute_db else None,
        )
    block_m, block_n, num_warps = row_block_settings(n_cols)
    if compute_dw or compute_db:
        programs, rows_per_program = weight_grad_grid(n_rows, block_m, x.device)
    else:
        programs, rows_per_program = triton.cdiv(n_rows, block_m), block_m

    # One float32 buffer holds the weight and bias partials so that a single launch sums both.
    partials = torch.empty((compute_dw + compute_db, programs, n_cols), dtype=torch.float32, device=x.device)
    dw_partial = partials[0] if compute_dw else rstd  # rstd: a placeholder that is never written
    db_partial = partials[-1] if compute_db else rstd
    _layer_norm_bwd_kernel[(programs,)](
        dx,
        dw_partial,
        db_partial,
        dy,
        x,
        weight.contiguous(),
        mean,
        rstd,
        dx.stride(0),
        dy.stride(0),
        x.stride(0),
        n_rows,
        n_cols,
        rows_per_program,
        HAS_DW=compute_dw,
        HAS_DB=compute_db,
        PREFETCH=rows_per_program > block_m,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        **weight_grad_launch_options(num_warps, compute_dw or compute_db),
    )
    if not (compute_dw or compute_db):
        return dx, None, None
    sums = sum_partials(partials, weight.dtype)
    dw = sums[0] if compute_dw else None
    db = sums[-1].to(bias.dtype) if compute_db else None
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    """Autograd for LayerNorm: saves x (as a row view) and a float32 mean and rstd per row.

    ``apply(x, weight, bias_or_None, eps)``; no gradient work for a frozen weight or bias.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        _check_inputs(x, weight, bias)
        x_rows = as_rows(x)
        y, mean, rstd = layer_norm_forward(x_rows, weight, bias, float(eps))
        ctx.save_for_backward(x_rows, weight, bias, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_rows, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(
            as_rows(dy),
            x_rows,
            weight,
            bias,
            mean,
            rstd,
            compute_dw=ctx.needs_input_grad[1],
            compute_db=ctx.needs_input_grad[2],
        )
        return dx.view(dy.shape), dw, db, None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension: ``(x - mean) * rsqrt(var + eps) * weight + bias``.

    ``var`` is the biased variance; statistics and the affine map are computed in float32 and the result
    is cast to x's dtype once, as ``torch.nn.LayerNorm`` does. CUDA tensors (and CPU tensors under
    ``TRITON_INTERPRET=1``) run the Triton kernels; other CPU tensors run
    :func:`swiftune_kernels.reference.layer_norm.layer_norm`.

    Args:
        x: (..., hidden) float32, float16 or bfloat16 input; any strides.
        weight: (hidden,) scale. Frozen (``requires_grad=False``) parameters get no gradient computed.
        bias: (hidden,) shift, or None for a LayerNorm without bias.
        eps: added to the variance before the reciprocal square root.

    Returns:
        (..., hidden) tensor of x's dtype.

    Raises:
        TypeError: x, weight or bias is not a floating tensor of a supported dtype.
        ValueError: weight or bias is not of shape (hidden,), or the tensors sit on different devices.
    """
    if use_triton(x):
        return LayerNormFunction.apply(x, weight, bias, eps)
    _check_inputs(x, weight, bias)
    return layer_norm_reference(x, weight, bias, eps)
