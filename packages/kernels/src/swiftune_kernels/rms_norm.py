"""RMSNorm (Llama and Gemma flavours): fused Triton forward and backward.

Forward: one program normalises BLOCK_M rows held whole in registers (BLOCK_M = 1 for wide rows, several
for narrow ones such as per-head q/k norms) and saves one float32 rstd per row. Backward reads x, dy and
rstd once and writes dx once. The weight gradient, when the weight requires one, is reduced in two stages:
each program (two per SM) walks a group of rows, prefetching the next row block while it works on the
current one, accumulates in float32 registers and writes one row of a (programs, hidden) float32 buffer;
then a small kernel sums the buffer into the weight's dtype (no atomics: deterministic). A frozen weight
skips all of that: one row block per program, no buffer.

The launch helpers (row_block_settings, weight_grad_grid, sum_partials, as_rows) are shared with
layer_norm.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from swiftune_kernels.dispatch import check_floating, check_same_device, use_triton
from swiftune_kernels.reference.rms_norm import rms_norm as rms_norm_reference

CASTINGS = ("llama", "gemma")
# A row lives whole in registers; past this width the kernels would spill badly.
MAX_HIDDEN = 65536
# Rows narrower than this are packed several to a program so that each program still moves enough bytes.
_ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _rms_norm_fwd_kernel(
    y_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    stride_ym,
    stride_xm,
    n_rows,
    n_cols,
    eps,
    offset,
    CAST_NORMED: tl.constexpr,
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
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = x * rstd[:, None]
    if CAST_NORMED:
        # Llama rounds the normalised x to the input dtype before the weight multiplies it.
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], normed * w[None, :], mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _load_rows(x_ptr, dy_ptr, rstd_ptr, rows, row_end, cols, col_mask, stride_xm, stride_dym):
    row_mask = rows < row_end
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    # Kept in the storage dtype: prefetched blocks then hold half the registers (bf16) until used.
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    return x, dy, rstd


@triton.jit
def _rms_norm_bwd_kernel(
    dx_ptr,
    dw_partial_ptr,
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    stride_dxm,
    stride_dym,
    stride_xm,
    n_rows,
    n_cols,
    rows_per_program,
    offset,
    CAST_NORMED: tl.constexpr,
    HAS_DW: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    if PREFETCH:
        x_in, dy_in, rstd = _load_rows(
            x_ptr, dy_ptr, rstd_ptr, row_start + tl.arange(0, BLOCK_M), row_end, cols, col_mask, stride_xm, stride_dym
        )
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        if PREFETCH:
            # The next block's loads go out before this block's math: a program walking many rows keeps two
            # blocks in flight instead of stalling on every load.
            x_next, dy_next, rstd_next = _load_rows(
                x_ptr, dy_ptr, rstd_ptr, rows + BLOCK_M, row_end, cols, col_mask, stride_xm, stride_dym
            )
        else:
            x_in, dy_in, rstd = _load_rows(
                x_ptr, dy_ptr, rstd_ptr, rows, row_end, cols, col_mask, stride_xm, stride_dym
            )
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        x, dy = x_in.to(tl.float32), dy_in.to(tl.float32)
        normed = x * rstd[:, None]
        dnormed = dy * w[None, :]
        # Masked columns hold zeros in x and dy, so they add nothing to the row sums.
        mean_dot = tl.sum(dnormed * normed, axis=1) / n_cols
        dx = rstd[:, None] * (dnormed - normed * mean_dot[:, None])
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm + cols[None, :], dx, mask=mask)
        if HAS_DW:
            if CAST_NORMED:
                normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw_acc += dy * normed
        if PREFETCH:
            x_in, dy_in, rstd = x_next, dy_next, rstd_next

    if HAS_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


@triton.jit
def _sum_partials_kernel(out_ptr, partial_ptr, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # Second stage of the parameter-gradient reduction: buffer program_id(1) of (buffers, partials, hidden)
    # float32 is summed over its partials and written once in the parameter's dtype (no extra cast kernel).
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    buffer = tl.program_id(1).to(tl.int64)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts < n_partials)[:, None] & col_mask[None, :]
        offsets = (buffer * n_partials + parts.to(tl.int64))[:, None] * n_cols + cols[None, :]
        acc += tl.load(partial_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + buffer * n_cols + cols, tl.sum(acc, axis=0), mask=col_mask)


def row_block_settings(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for row-wise kernels over rows of ``n_cols`` elements.

    One row per program from 4096 columns up; narrower rows are packed so a program touches ~4096
    elements. About 16 fp32 elements per thread per tensor: two 16-byte loads per thread for bf16.
    """
    if n_cols > MAX_HIDDEN:
        raise ValueError(
            f"hidden size {n_cols} is larger than the {MAX_HIDDEN} the Triton norm kernels support; call the "
            "pure-torch version in swiftune_kernels.reference instead."
        )
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, _ELEMENTS_PER_PROGRAM // block_n)
    num_warps = min(32, max(4, block_m * block_n // 512))
    return block_m, block_n, num_warps


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def weight_grad_grid(n_rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows_per_program) for a backward that also reduces weight gradients.

    Two programs per SM: both stay resident (see weight_grad_launch_options), and with few programs the
    (programs, hidden) float32 partial buffer costs ~2% of the main traffic at 16384 rows. On the CPU
    (interpreter) two programs, so that tests walk the row loop, its tail and the two-stage sum.
    """
    target = 2 * _multiprocessor_count(device.index or 0) if device.type == "cuda" else 2
    n_blocks = triton.cdiv(n_rows, block_m)
    rows_per_program = triton.cdiv(n_blocks, min(target, n_blocks)) * block_m
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


def weight_grad_launch_options(num_warps: int, has_weight_grad: bool) -> dict:
    """Extra launch options for a backward that accumulates parameter gradients.

    With 8 warps, capping registers at 128 lets two programs share an SM, which weight_grad_grid counts on
    (sm_90 compile: LayerNorm at hidden 4096 would otherwise take 164 and run one per SM; at 128 no spill).
    """
    return {"maxnreg": 128} if has_weight_grad and num_warps == 8 else {}


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum (buffers, partials, hidden) float32 over its partials into (buffers, hidden) of ``dtype``."""
    n_buffers, n_partials, n_cols = partials.shape
    out = torch.empty((n_buffers, n_cols), dtype=dtype, device=partials.device)
    # 32 float32 columns = one 128-byte line per partial row; 128 programs per buffer at hidden 4096.
    grid = (triton.cdiv(n_cols, 32), n_buffers)
    _sum_partials_kernel[grid](out, partials, n_partials, n_cols, BLOCK_P=64, BLOCK_N=32, num_warps=4)
    return out


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, hidden) view of ``t`` with unit column stride (a copy only when no such view exists)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, casting: str) -> None:
    check_floating("x", x)
    check_floating("weight", weight)
    check_same_device(x=x, weight=weight)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden dimension to normalise), got a scalar.")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match the last dimension of x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}."
        )
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}.")


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on (rows, hidden) ``x`` with unit column stride; return (y, rstd (rows,) float32)."""
    assert x.dim() == 2 and (x.stride(-1) == 1 or x.shape[-1] == 1), "call with as_rows(x)"
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block_m, block_n, num_warps = row_block_settings(n_cols)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        y,
        x,
        weight.contiguous(),
        rstd,
        y.stride(0),
        x.stride(0),
        n_rows,
        n_cols,
        eps,
        offset,
        CAST_NORMED=casting == "llama",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting: str,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward on (rows, hidden) tensors; return (dx, dweight or None when not ``compute_dw``)."""
    assert dy.shape == x.shape, "dy and x must both be as_rows() views of one shape"
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight) if compute_dw else None
    block_m, block_n, num_warps = row_block_settings(n_cols)
    if compute_dw:
        programs, rows_per_program = weight_grad_grid(n_rows, block_m, x.device)
        dw_partial = torch.empty((1, programs, n_cols), dtype=torch.float32, device=x.device)
    else:
        # Without a weight gradient there is nothing to carry across rows: one row block per program.
        programs, rows_per_program = triton.cdiv(n_rows, block_m), block_m
        dw_partial = rstd  # never written: HAS_DW is off
    _rms_norm_bwd_kernel[(programs,)](
        dx,
        dw_partial,
        dy,
        x,
        weight.contiguous(),
        rstd,
        dx.stride(0),
        dy.stride(0),
        x.stride(0),
        n_rows,
        n_cols,
        rows_per_program,
        offset,
        CAST_NORMED=casting == "llama",
        HAS_DW=compute_dw,
        PREFETCH=rows_per_program > block_m,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        **weight_grad_launch_options(num_warps, compute_dw),
    )
    dw = sum_partials(dw_partial, weight.dtype)[0] if compute_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd for RMSNorm: saves x (as a row view) and one float32 rstd per row.

    ``apply(x, weight, eps, offset, casting)``; no weight-gradient work when the weight is frozen.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str) -> torch.Tensor:
        _check_inputs(x, weight, casting)
        x_rows = as_rows(x)
        # Floats always: Triton would specialise an int offset of 1 into a separate compile.
        eps, offset = float(eps), float(offset)
        y, rstd = rms_norm_forward(x_rows, weight, eps, offset, casting)
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.offset = offset
        ctx.casting = casting
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_rows, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(
            as_rows(dy), x_rows, weight, rstd, ctx.offset, ctx.casting, compute_dw=ctx.needs_input_grad[1]
        )
        return dx.view(dy.shape), dw, None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, casting: str = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dimension: ``x * rsqrt(mean(x^2) + eps) * (offset + weight)``.

    Statistics are computed in float32. ``casting="llama"`` rounds the normalised x to x's dtype before
    the weight multiplies it (transformers' LlamaRMSNorm); ``casting="gemma"`` keeps ``offset + weight``
    and the product in float32 and rounds once at the end (transformers' GemmaRMSNorm). The output has
    x's dtype whatever the weight's dtype. CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``)
    run the Triton kernels; other CPU tensors run :func:`swiftune_kernels.reference.rms_norm.rms_norm`.

    Args:
        x: (..., hidden) float32, float16 or bfloat16 input; any strides.
        weight: (hidden,) scale. A weight with ``requires_grad=False`` gets no gradient computed.
        eps: added to the mean square before the reciprocal square root.
        offset: 0.0 for Llama-style weights, 1.0 for Gemma-style ``(1 + weight)``.
        casting: "llama" or "gemma", see above.

    Returns:
        (..., hidden) tensor of x's dtype.

    Raises:
        TypeError: x or weight is not a floating tensor of a supported dtype.
        ValueError: weight is not of shape (hidden,), tensors sit on different devices, or casting is unknown.
    """
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, eps, offset, casting)
    _check_inputs(x, weight, casting)
    return rms_norm_reference(x, weight, eps, offset, casting)
