"""The small launches around the cross-entropy kernel: loss options, the mean's denominator, the reductions and the
backward scaling of the stored gradient (shared with the fused linear cross-entropy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")


def _cdiv(a: int, b: int) -> int:
    # plain Python: triton.cdiv / next_power_of_2 are constexpr functions that cost ~10 us a call on the host
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The power of 2 at or above ``n`` (plain Python: triton's is a constexpr function, ~10 us a host call)."""
    return 1 << max(int(n) - 1, 0).bit_length()


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the property query is slow)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


@triton.jit
def _cross_entropy_mean_weight_kernel(
    target_ptr, stride_t, n_rows, ignore_index, weight_ptr, denominator_ptr, BLOCK: tl.constexpr
):
    # One program: the count of kept targets and its inverse (the row weight), instead of ~4 small torch ops.
    offs = tl.arange(0, BLOCK)
    kept = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_rows, BLOCK):
        rows = start + offs
        t = tl.load(target_ptr + rows.to(tl.int64) * stride_t, mask=rows < n_rows, other=ignore_index)
        kept += (t != ignore_index).to(tl.int32)
    denominator = tl.sum(kept, 0).to(tl.float32)
    tl.store(denominator_ptr, denominator)
    tl.store(weight_ptr, 1.0 / denominator)


@triton.jit
def _cross_entropy_mean_kernel(loss_ptr, n_rows, denominator_ptr, out_ptr, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        total += tl.load(loss_ptr + rows, mask=rows < n_rows, other=0.0)
    tl.store(out_ptr, tl.sum(total, 0) / tl.load(denominator_ptr))


@triton.jit
def _cross_entropy_bwd_kernel(
    grad_ptr,
    stride_gm,
    grad_output_ptr,
    stride_gom,
    n_cols,
    programs_per_row,
    BLOCK_V: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // programs_per_row).to(tl.int64)
    # int64: a scalar grad_output scales a whole weight gradient as one row, which can pass 2**31 elements.
    col_start = (pid % programs_per_row).to(tl.int64) * (BLOCK_V * BLOCKS_PER_PROGRAM)
    scale = tl.load(grad_output_ptr + row * stride_gom).to(tl.float32)
    # loss.backward() gives grad_output == 1: skip the pass over the gradient instead of syncing to find out.
    if scale != 1.0:
        g_row = grad_ptr + row * stride_gm
        for span in range(col_start, n_cols, programs_per_row * (BLOCK_V * BLOCKS_PER_PROGRAM)):
            for i in range(0, BLOCKS_PER_PROGRAM):
                cols = span + i * BLOCK_V + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(g_row + cols, g * scale, mask=mask)


def mean_weight(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: (row weight (1,), mean denominator ()) for reduction "mean" over the non-ignored targets."""
    out = torch.empty(2, dtype=torch.float32, device=targets.device)
    block = min(4096, next_power_of_2(max(targets.numel(), 1)))
    _cross_entropy_mean_weight_kernel[(1,)](
        targets, targets.stride(0), targets.numel(), ignore_index, out, out[1:], BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return out[:1], out[1]


def mean_loss(loss: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """One launch: sum(loss) / denominator, float32."""
    out = torch.empty((), dtype=torch.float32, device=loss.device)
    block = min(4096, next_power_of_2(max(loss.numel(), 1)))
    _cross_entropy_mean_kernel[(1,)](
        loss, loss.numel(), denominator, out, BLOCK=block, num_warps=4 if block <= 1024 else 8
    )
    return out


_BWD_MAX_PROGRAMS = 1024  # programs that scale a whole gradient by one grad_output (each loops over its spans)


def cross_entropy_backward(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Scale ``grad`` in place by ``grad_output`` (one value, or one per row of a 2-D ``grad``); returns ``grad``."""
    per_row = grad_output.numel() > 1
    rows = grad.view(1, -1) if not per_row and grad.is_contiguous() else grad.view(grad.shape[0], -1)
    n_rows, n_cols = rows.shape
    assert rows.stride(1) == 1 and grad_output.numel() in (1, n_rows)
    if grad.numel() == 0:
        return grad
    # 64k elements per program; a scalar grad_output scales the whole tensor as one row with at most 1024 programs,
    # each looping: where grad_output is 1 (the usual case) the launch is a few waves of programs that exit at once.
    per_program = min(next_power_of_2(n_cols), 65536)
    block = min(per_program, 4096)
    programs_per_row = _cdiv(n_cols, per_program)
    if not per_row:
        programs_per_row = min(programs_per_row, _BWD_MAX_PROGRAMS)
    _cross_entropy_bwd_kernel[(n_rows * programs_per_row,)](
        rows,
        rows.stride(0),
        grad_output,
        grad_output.stride(0) if per_row else 0,
        n_cols,
        programs_per_row,
        BLOCK_V=block,
        BLOCKS_PER_PROGRAM=per_program // block,
        num_warps=4 if block <= 1024 else 8,
    )
    return grad


def check_loss_options(
    targets: torch.Tensor,
    n_rows: int,
    reduction: str,
    logit_scale: float | None,
    softcap: float | None,
    num_items_in_batch: int | torch.Tensor | None,
) -> None:
    """Raise a TypeError / ValueError a user can act on for bad targets or loss options."""
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an int64 tensor of class indices, got {got}; cast it with .long().")
    if targets.shape != (n_rows,):
        raise ValueError(
            f"targets must have shape ({n_rows},), one class index per row, got {tuple(targets.shape)}; "
            "flatten with .view(-1) after shifting the labels."
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number (e.g. 30.0 for Gemma 2), got {softcap}.")
    if logit_scale is not None and not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale must be a Python float, got {type(logit_scale).__name__}.")
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(
            f"num_items_in_batch replaces the denominator of reduction='mean', but reduction={reduction!r}; "
            "leave it out or use reduction='mean'."
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a 0-d tensor, got shape {tuple(num_items_in_batch.shape)}.")
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int) or num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be a positive int or a 0-d tensor, got {num_items_in_batch!r}.")


def cross_entropy_weight(
    targets: torch.Tensor, ignore_index: int, reduction: str, num_items_in_batch: int | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row weight d(loss)/d(loss_i) as a (1,) float32 tensor, and the mean's denominator (None otherwise).

    Both stay on the device: the count of non-ignored targets is never read back to the host.
    """
    device = targets.device
    if reduction != "mean":
        return torch.ones(1, dtype=torch.float32, device=device), None
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum().to(torch.float32)
    elif isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(device=device, dtype=torch.float32).reshape(())
    else:
        denominator = torch.full((), float(num_items_in_batch), dtype=torch.float32, device=device)
    return (1.0 / denominator).reshape(1), denominator


def reduce_loss(loss: torch.Tensor, reduction: str, denominator: torch.Tensor | None) -> torch.Tensor:
    """Reduce per-row losses the way :func:`cross_entropy_weight` weighted their gradients."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator
