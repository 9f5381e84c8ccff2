"""Embedding lookup from a table kept in page-locked host memory: the GPU reads only the rows it needs.

A frozen input embedding of a large vocabulary holds ~1 GB of GPU memory (128256 x 4096 in bf16), yet a training
step reads only its batch's rows (4096 tokens: 32 MiB). Kept in page-locked host memory, the table is read by the
kernel directly over the PCIe link (CUDA's unified addressing maps page-locked memory into the device's address
space): one row per program, no host synchronization, no copy of the whole table.

``host_embedding(ids, table)`` is ``torch.nn.functional.embedding(ids, table)`` with the result on ``ids``' device.
The table is frozen (no gradient flows to it); :func:`pin_table` makes such a table from a weight. The bytes are
exactly those of the table: the table is registered with the driver in place rather than copied into PyTorch's
pinned pool, which rounds every block up to a power of two (a 1.05 GB table would take 2 GiB of host memory).

Dispatch: ids on a CUDA device → the Triton kernel reading the host table; ids on the CPU → the reference (a plain
lookup), or the kernel in Triton's interpreter under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swiftune_kernels.dispatch import check_floating, use_triton
from swiftune_kernels.offload_host_copy import register_pinned


@triton.jit
def _gather_rows_kernel(
    table_ptr,
    ids_ptr,
    out_ptr,
    n_columns,
    table_row_stride,
    out_row_stride,
    BLOCK: tl.constexpr,
):
    """out[row, :] = table[ids[row], :]; one program per row, BLOCK columns at a time."""
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(ids_ptr + row).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    for start in range(0, n_columns, BLOCK):
        mask = start + columns < n_columns
        values = tl.load(table_ptr + token * table_row_stride + start + columns, mask=mask)
        tl.store(out_ptr + row * out_row_stride + start + columns, values, mask=mask)


def _gather_rows(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    n_rows = ids.numel()
    if n_rows == 0:
        return
    block = min(1024, triton.next_power_of_2(table.shape[1]))
    _gather_rows_kernel[(n_rows,)](table, ids, out, table.shape[1], table.stride(0), out.stride(0), BLOCK=block)


def _check(ids: torch.Tensor, table: torch.Tensor) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64 token ids, got {ids.dtype}.")
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D (vocab, hidden), got shape {tuple(table.shape)}.")
    check_floating("table", table)
    if table.device.type != "cpu":
        raise ValueError(
            f"table must sit in host memory (made by pin_table), got a table on {table.device}; on the GPU use "
            "torch.nn.functional.embedding."
        )
    if table.requires_grad:
        raise ValueError(
            "host_embedding reads a frozen table: no gradient flows to it. Keep a trained embedding on the GPU "
            "(plain torch.nn.Embedding), or call requires_grad_(False) on the table."
        )
    if table.stride(1) != 1:
        raise ValueError("table rows must be contiguous; pass table.contiguous().")


def host_embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Look up ``ids`` in a frozen host-memory ``table``; the rows come back on ``ids``' device.

    Args:
        ids: token ids, int32 or int64, any shape ``(...)``, on the device that gets the rows.
        table: ``(V, H)`` float table in page-locked host memory (:func:`pin_table`), not requiring grad.

    Returns:
        ``(..., H)`` tensor of ``table``'s dtype on ``ids``' device, equal to ``table[ids]``.

    On a CUDA device an id outside ``[0, V)`` stops the process with a device-side assertion, as
    ``torch.nn.functional.embedding`` does there; on the CPU it raises IndexError.
    """
    _check(ids, table)
    flat = ids.reshape(-1).contiguous()
    if flat.is_cuda:
        if not table.is_pinned():
            raise ValueError("a CUDA lookup needs a page-locked table; make it with pin_table(weight).")
        # Checked on the device without waiting for it: a bad id must not read outside the table.
        valid = ((flat >= 0) & (flat < table.shape[0])).all()
        torch._assert_async(valid, "host_embedding: a token id is outside [0, vocab size)")
    elif flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= table.shape[0]):
        raise IndexError(f"token ids must be in [0, {table.shape[0]}), got {int(flat.min())}..{int(flat.max())}.")
    if not use_triton(ids):
        return torch.nn.functional.embedding(ids.to(table.device), table).to(ids.device)
    out = torch.empty(flat.numel(), table.shape[1], dtype=table.dtype, device=ids.device)
    _gather_rows(table, flat, out)
    return out.view(*ids.shape, table.shape[1])


def pin_table(weight: torch.Tensor) -> torch.Tensor:
    """A frozen copy of ``weight`` in page-locked host memory, of exactly its size, for :func:`host_embedding`.

    The copy is registered with the CUDA driver in place (and unregistered when it is freed). Without CUDA it is a
    plain host copy, which the CPU paths of :func:`host_embedding` read just the same.
    """
    return register_pinned(weight.detach().to("cpu", copy=True).contiguous())
