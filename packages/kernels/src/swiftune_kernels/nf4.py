"""Dequantization of bitsandbytes' 4-bit weights (NF4, double quantization included) in one Triton pass.

Memory-bound: reads n/2 bytes of packed indices (plus one scale per block) and writes n 16-bit values, so the
floor is ~2.5 bytes an element. One program covers whole quantization blocks, a (BLOCKS_PER_PROGRAM, BLOCK_COLS)
tile of ~4096 elements: each block's scale (double-quantized or not) is computed once and broadcast along its
row, and the 16-entry code table is a gather that stays in L1. The math (and its exact float32 rounding order) is
documented in :mod:`swiftune_kernels.reference.nf4`; the result is bit-identical to ``dequantize_4bit``.

The weight is frozen, so there is no autograd Function: the output never requires grad.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from swiftune_kernels.dispatch import check_same_device, use_triton
from swiftune_kernels.reference import nf4 as _reference

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr,
    code_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    out_ptr,
    numel,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    NESTED: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks = pid.to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_COLS)
    block_mask = blocks < n_blocks
    if NESTED:
        qabsmax = tl.load(absmax_ptr + blocks, mask=block_mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=block_mask, other=0.0)
        # two roundings (product, then sum), as bitsandbytes does; the launcher turns off FMA contraction
        absmax = tl.load(code2_ptr + qabsmax, mask=block_mask, other=0.0) * scale2 + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0).to(tl.float32)

    elem = blocks[:, None] * BLOCKSIZE + cols[None, :]
    mask = (cols < BLOCKSIZE)[None, :] & (elem < numel)
    byte = tl.load(packed_ptr + (elem >> 1), mask=mask, other=0).to(tl.int32)
    index = tl.where((elem & 1) == 0, byte >> 4, byte & 15)  # element 2j is the high nibble of byte j
    value = tl.load(code_ptr + index, mask=mask, other=0.0)
    w = value * absmax[:, None]
    if ROUND_BF16:
        # round to nearest even by hand: Triton's interpreter truncates fp32 -> bf16, the GPU rounds; this gives
        # the GPU's (and bitsandbytes') bits on both, so tests can ask for equality (the values are finite)
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        w = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(out_ptr + elem, w, mask=mask)


_TILE_ELEMENTS = 4096  # 16 outputs a thread at 8 warps: two 16-byte stores in bf16


def dequantize_nf4_forward(packed: torch.Tensor, quant_state, out_dtype: torch.dtype) -> torch.Tensor:
    """Launch the dequantization of ``packed`` into a new contiguous tensor of ``quant_state.shape``."""
    shape = tuple(quant_state.shape)
    numel = math.prod(shape)
    out = torch.empty(shape, dtype=out_dtype, device=packed.device)
    if numel == 0:
        return out
    blocksize = int(quant_state.blocksize)
    n_blocks = triton.cdiv(numel, blocksize)
    block_cols = triton.next_power_of_2(blocksize)
    per_program = max(1, _TILE_ELEMENTS // block_cols)
    absmax = quant_state.absmax.reshape(-1)
    if quant_state.nested:
        state2 = quant_state.state2
        code2, absmax2, blocksize2 = state2.code.float(), state2.absmax.reshape(-1).float(), int(state2.blocksize)
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device).reshape(1)
    else:  # unused pointers: any valid tensor
        code2, absmax2, blocksize2, offset = absmax, absmax, 1, absmax
        absmax = absmax.float()
    grid = (triton.cdiv(n_blocks, per_program),)
    _nf4_dequantize_kernel[grid](
        packed.reshape(-1), quant_state.code.float(), absmax, code2, absmax2, offset, out, numel, n_blocks,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, BLOCK_COLS=block_cols, BLOCKS_PER_PROGRAM=per_program,
        NESTED=bool(quant_state.nested), ROUND_BF16=out_dtype == torch.bfloat16, num_warps=8, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _check(packed: torch.Tensor, quant_state, out_dtype: torch.dtype) -> torch.Tensor:
    for attr in ("absmax", "shape", "code", "blocksize", "dtype"):
        if getattr(quant_state, attr, None) is None:
            raise TypeError(
                f"quant_state has no {attr!r}: pass the bitsandbytes QuantState of the weight (param.quant_state)."
            )
    if getattr(quant_state, "quant_type", "nf4") not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_state.quant_type!r}.")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}.")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a tensor (the weight's .data), got {type(packed).__name__}.")
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage may be another dtype over the same bytes
        packed = packed.contiguous().reshape(-1).view(torch.uint8)
    numel = math.prod(tuple(quant_state.shape))
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed holds {packed.numel()} bytes but quant_state.shape {tuple(quant_state.shape)} needs "
            f"{(numel + 1) // 2}; pass the weight's own .data and .quant_state."
        )
    n_blocks = -(-numel // int(quant_state.blocksize))
    if quant_state.absmax.numel() != n_blocks:
        raise ValueError(f"quant_state.absmax has {quant_state.absmax.numel()} scales, expected {n_blocks}.")
    if quant_state.code.numel() != 16:
        raise ValueError(f"quant_state.code must hold the 16 levels of the 4-bit type, got {quant_state.code.numel()}.")
    if quant_state.nested:
        state2 = quant_state.state2
        check_same_device(packed=packed, absmax=quant_state.absmax, code=quant_state.code, absmax2=state2.absmax)
    else:
        check_same_device(packed=packed, absmax=quant_state.absmax, code=quant_state.code)
    return packed.contiguous()


def dequantize_nf4(packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight (NF4, or FP4 through its code table), double quantization included.

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``: each value is
    ``code[index] * absmax[block]`` in float32, rounded once to ``out_dtype``. bitsandbytes is not imported;
    ``quant_state`` is read by attribute.

    Args:
        packed: (ceil(n / 2), 1) uint8, the ``.data`` of a ``Params4bit`` (two indices a byte, high nibble first).
        quant_state: a ``bitsandbytes.functional.QuantState`` (or any object with its attributes ``absmax``,
            ``shape``, ``code``, ``blocksize``, ``quant_type``, ``dtype``, ``nested``, ``offset`` and ``state2``
            with its own ``absmax``, ``code`` and ``blocksize``).
        out_dtype: bfloat16, float16 or float32; defaults to ``quant_state.dtype``.

    Returns:
        weight: ``quant_state.shape`` (e.g. (out_features, in_features)), contiguous, in ``out_dtype``.
    """
    out_dtype = getattr(quant_state, "dtype", None) if out_dtype is None else out_dtype
    packed = _check(packed, quant_state, out_dtype)
    if use_triton(packed):
        return dequantize_nf4_forward(packed, quant_state, out_dtype)
    return _reference.dequantize_nf4(packed, quant_state, out_dtype)
