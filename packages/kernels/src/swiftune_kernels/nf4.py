"""Dequantization of bitsandbytes' 4-bit weights (NF4, double quantization included) in one Triton pass.

Memory-bound: reads n/2 bytes of packed indices (plus one scale per block) and writes n 16-bit values, so the
floor is ~2.5 bytes an element. Two kernels, chosen by :data:`CONFIG` (benchmarks/sweep_kernels.py times them):
"elements" covers whole quantization blocks, a (BLOCKS_PER_PROGRAM, BLOCK_COLS) tile of ~4096 elements, gathering
each element's byte and code entry; "bytes" loads a run of packed bytes (or int32 words) as vectors, decodes both
nibbles of each and stores the interleaved values as one contiguous run. The math (and its exact float32 rounding
order) is documented in :mod:`swiftune_kernels.reference.nf4`; the result is bit-identical to ``dequantize_4bit``.

The weight is frozen, so there is no autograd Function: the output never requires grad.
"""

from __future__ import annotations

import math
import weakref

import torch
import triton
import triton.language as tl

from swiftune_kernels.compiled_launch import launch_and_keep
from swiftune_kernels.dispatch import check_same_device, use_triton
from swiftune_kernels.reference import nf4 as _reference

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    # plain Python: triton.cdiv / next_power_of_2 are constexpr functions that cost ~10 us a call on the host
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@triton.jit
def _block_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blocks, n_blocks, BLOCKSIZE2, NESTED: tl.constexpr):
    block_mask = blocks < n_blocks
    if NESTED:
        qabsmax = tl.load(absmax_ptr + blocks, mask=block_mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=block_mask, other=0.0)
        # two roundings (product, then sum), as bitsandbytes does; the launcher turns off FMA contraction
        return tl.load(code2_ptr + qabsmax, mask=block_mask, other=0.0) * scale2 + tl.load(offset_ptr)
    return tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0).to(tl.float32)


@triton.jit
def _round_to_bf16(w):
    # round to nearest even by hand: Triton's interpreter truncates fp32 -> bf16, the GPU rounds; this gives
    # the GPU's (and bitsandbytes') bits on both, so tests can ask for equality (the values are finite)
    bits = w.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


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
    # One output element at a time: its byte and its code entry are gathered per element (any block size).
    pid = tl.program_id(0)
    blocks = pid.to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_COLS)
    absmax = _block_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blocks, n_blocks, BLOCKSIZE2, NESTED)
    elem = blocks[:, None] * BLOCKSIZE + cols[None, :]
    mask = (cols < BLOCKSIZE)[None, :] & (elem < numel)
    byte = tl.load(packed_ptr + (elem >> 1), mask=mask, other=0).to(tl.int32)
    index = tl.where((elem & 1) == 0, byte >> 4, byte & 15)  # element 2j is the high nibble of byte j
    value = tl.load(code_ptr + index, mask=mask, other=0.0)
    w = value * absmax[:, None]
    if ROUND_BF16:
        w = _round_to_bf16(w)
    tl.store(out_ptr + elem, w, mask=mask)


@triton.jit
def _nf4_code_lookup(index, code_ptr, LUT: tl.constexpr):
    if LUT == "tree":
        # 16 scalars and a binary tree of selects on the index bits: ALU work, no memory access per element
        b = (index & 1) != 0
        l0 = tl.where(b, tl.load(code_ptr + 1), tl.load(code_ptr + 0))
        l1 = tl.where(b, tl.load(code_ptr + 3), tl.load(code_ptr + 2))
        l2 = tl.where(b, tl.load(code_ptr + 5), tl.load(code_ptr + 4))
        l3 = tl.where(b, tl.load(code_ptr + 7), tl.load(code_ptr + 6))
        l4 = tl.where(b, tl.load(code_ptr + 9), tl.load(code_ptr + 8))
        l5 = tl.where(b, tl.load(code_ptr + 11), tl.load(code_ptr + 10))
        l6 = tl.where(b, tl.load(code_ptr + 13), tl.load(code_ptr + 12))
        l7 = tl.where(b, tl.load(code_ptr + 15), tl.load(code_ptr + 14))
        b = (index & 2) != 0
        m0, m1, m2, m3 = tl.where(b, l1, l0), tl.where(b, l3, l2), tl.where(b, l5, l4), tl.where(b, l7, l6)
        b = (index & 4) != 0
        n0, n1 = tl.where(b, m1, m0), tl.where(b, m3, m2)
        return tl.where((index & 8) != 0, n1, n0)
    return tl.load(code_ptr + index)  # a gather from a 64-byte table that stays in L1


@triton.jit
def _nf4_dequantize_bytes_kernel(
    packed_ptr,
    code_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    out_ptr,
    numel,
    n_blocks,
    n_packed,
    PACKED_PER_BLOCK: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    UNITS_PER_PROGRAM: tl.constexpr,
    PER_UNIT: tl.constexpr,
    NESTED: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    LUT: tl.constexpr,
    WORDS: tl.constexpr,
):
    # A run of packed units loaded as contiguous vectors: bytes, or with WORDS int32 words of 4 bytes (8 indices;
    # little-endian, so byte i of a word is bits 8i..8i+7). A unit never straddles two blocks: one scale a unit.
    # Each unit's indices are decoded along a new last axis in element order, so the flattened tile is the output
    # run: one contiguous store. n_packed comes from the host, so that Triton knows its divisibility and vectorizes.
    start = tl.program_id(0).to(tl.int64) * UNITS_PER_PROGRAM
    unit = start + tl.arange(0, UNITS_PER_PROGRAM)
    packed = tl.load(packed_ptr + unit, mask=unit < n_packed, other=0).to(tl.int32)
    scale = _block_scales(
        absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, unit // PACKED_PER_BLOCK, n_blocks, BLOCKSIZE2, NESTED
    )
    if LUT == "pair":
        # code_ptr is a (256, 2) table of (code[byte >> 4], code[byte & 15]): one 8-byte gather a byte
        if WORDS:
            byte = (packed[:, None] >> (tl.arange(0, 4) * 8)[None, :]) & 255
            pair = tl.load(code_ptr + byte[:, :, None] * 2 + tl.arange(0, 2)[None, None, :])
            w = pair * scale[:, None, None]
        else:
            w = tl.load(code_ptr + packed[:, None] * 2 + tl.arange(0, 2)[None, :]) * scale[:, None]
    else:
        # element 2i is the high nibble of byte i: shifts 4, 0 (byte 0), 12, 8 (byte 1), ...
        k = tl.arange(0, PER_UNIT)
        index = (packed[:, None] >> ((k // 2) * 8 + (1 - k % 2) * 4)[None, :]) & 15
        w = _nf4_code_lookup(index, code_ptr, LUT) * scale[:, None]
    w = tl.reshape(w, [UNITS_PER_PROGRAM * PER_UNIT])
    if ROUND_BF16:
        w = _round_to_bf16(w)
    elem = start * PER_UNIT + tl.arange(0, UNITS_PER_PROGRAM * PER_UNIT)
    tl.store(out_ptr + elem, w, mask=elem < numel)


# Launch configuration (one line to switch to a sweep's winner, benchmarks/sweep_kernels.py): "elements" is the
# kernel that gathers per output element, "bytes" the one that loads packed units as vectors; for "bytes": the code
# lookup ("load": gather from the table, "tree": selects, "pair": a 256-entry table of value pairs), int32 words or
# bytes as units, the packed bytes a program covers, its warps, and whether bf16 is rounded by hand on the GPU too
# (always under the interpreter, which truncates).
CONFIG = {
    "kernel": "bytes",
    "lut": "load",
    "words": True,
    "bytes_per_program": 2048,
    "num_warps": 8,
    "hand_round": True,
}
_TILE_ELEMENTS = 4096  # "elements": 16 outputs a thread at 8 warps: two 16-byte stores in bf16
LUTS = ("load", "tree", "pair")


# code table -> its (256, 2) pair table, keyed by the table's identity and version: building it takes ~6 small
# launches, once per weight's table instead of once per call
_PAIR_TABLES: dict[int, tuple] = {}


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    hit = _PAIR_TABLES.get(id(code))
    if hit is not None and hit[0]() is code and hit[1] == code._version:
        return hit[2]
    index = torch.arange(256, device=code.device)
    table = torch.stack((code[index >> 4], code[index & 15]), dim=1).contiguous()
    if len(_PAIR_TABLES) >= 256:  # a bound, for programs that make many short-lived tables
        _PAIR_TABLES.clear()
    _PAIR_TABLES[id(code)] = (weakref.ref(code), code._version, table)
    return table


def dequantize_nf4_forward(
    packed: torch.Tensor, quant_state, out_dtype: torch.dtype, out: torch.Tensor | None = None, **config
) -> torch.Tensor:
    """Launch the dequantization of ``packed`` into ``out`` (contiguous, ``quant_state.shape``; new if None).

    ``config`` overrides entries of :data:`CONFIG` (the benchmarks' sweep). The launch's arguments other than
    ``out`` depend only on the weight, so they are prepared once per weight (:func:`_launch_plan`) and reused.
    """
    shape = tuple(quant_state.shape)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=packed.device)
    numel = out.numel()
    assert out.is_contiguous() and numel == math.prod(shape) and out.dtype == out_dtype
    if numel == 0:
        return out
    kernel, grid, before_out, after_out, options, relaunchers = _launch_plan(packed, quant_state, out_dtype, config)
    # Only out differs between a plan's launches; its 16-byte alignment is the one specialization it can change.
    aligned = out.data_ptr() % 16 == 0
    relaunch = relaunchers.get(aligned)
    if relaunch is not None:
        relaunch(*before_out, out, *after_out)
    else:
        relaunchers[aligned] = launch_and_keep(kernel, grid, (*before_out, out, *after_out), options)
    return out


# Prepared launches are kept on the quant_state itself, under this attribute, by (packed data pointer, out dtype,
# config): building one takes ~10 small torch calls (views, casts, the code's pair table), and a training step
# dequantizes each weight 2-3 times, so at small batches (where the CPU bounds the step) this is most of a
# launch's CPU time. Kept there, a plan lives exactly as long as its weight's quant_state.
_PLAN_ATTRIBUTE = "_swiftune_nf4_plans"


def _launch_plan(packed: torch.Tensor, quant_state, out_dtype: torch.dtype, config: dict) -> tuple:
    """(kernel, grid, arguments before ``out``, arguments after it, keyword options, kept launchers by out's
    alignment: :func:`~swiftune_kernels.compiled_launch.launch_and_keep`) of one weight's launch."""
    # The versions: a plan holds tables derived from the code and scales, which an in-place change must refresh.
    versions = (quant_state.code._version, quant_state.absmax._version)
    key = (packed.data_ptr(), out_dtype, tuple(sorted(config.items())), versions)
    plans = getattr(quant_state, _PLAN_ATTRIBUTE, None)
    if plans is not None and key in plans:
        return plans[key]
    config = {**CONFIG, **config}
    numel = math.prod(tuple(quant_state.shape))
    blocksize = int(quant_state.blocksize)
    n_blocks = _cdiv(numel, blocksize)
    absmax = quant_state.absmax.reshape(-1)
    if quant_state.nested:
        state2 = quant_state.state2
        code2, absmax2, blocksize2 = state2.code.float(), state2.absmax.reshape(-1).float(), int(state2.blocksize)
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device).reshape(1)
    else:  # unused pointers: any valid tensor
        code2, absmax2, blocksize2, offset = absmax, absmax, 1, absmax
        absmax = absmax.float()
    code = quant_state.code.float()
    round_bf16 = out_dtype == torch.bfloat16 and (config["hand_round"] or not packed.is_cuda)
    nested = bool(quant_state.nested)
    if config["kernel"] == "bytes" and blocksize % 2 == 0:
        assert config["lut"] in LUTS, config["lut"]
        flat = packed.reshape(-1)
        n_bytes = (numel + 1) // 2
        # int32 words where whole words fall in whole blocks and the bytes are 4-byte aligned
        words = config["words"] and blocksize % 8 == 0 and n_bytes % 4 == 0 and flat.data_ptr() % 4 == 0
        unit_bytes = 4 if words else 1
        units = max(1, config["bytes_per_program"] // unit_bytes)
        code_table = _pair_table(code) if config["lut"] == "pair" else code
        plan = (
            _nf4_dequantize_bytes_kernel,
            (_cdiv(n_bytes // unit_bytes, units),),
            (flat.view(torch.int32) if words else flat, code_table, absmax, code2, absmax2, offset),
            (numel, n_blocks, n_bytes // unit_bytes),
            dict(
                PACKED_PER_BLOCK=blocksize // (2 * unit_bytes), BLOCKSIZE2=blocksize2, UNITS_PER_PROGRAM=units,
                PER_UNIT=8 if words else 2, NESTED=nested, ROUND_BF16=round_bf16, LUT=config["lut"], WORDS=words,
                num_warps=config["num_warps"], enable_fp_fusion=False,
            ),
            {},
        )  # fmt: skip
    else:
        block_cols = _next_power_of_2(blocksize)
        per_program = max(1, _TILE_ELEMENTS // block_cols)
        plan = (
            _nf4_dequantize_kernel,
            (_cdiv(n_blocks, per_program),),
            (packed.reshape(-1), code, absmax, code2, absmax2, offset),
            (numel, n_blocks),
            dict(
                BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, BLOCK_COLS=block_cols, BLOCKS_PER_PROGRAM=per_program,
                NESTED=nested, ROUND_BF16=round_bf16, num_warps=8, enable_fp_fusion=False,
            ),
            {},
        )  # fmt: skip
    try:
        # one plan per weight in practice; a new data pointer (the weight moved) replaces the old plans
        setattr(quant_state, _PLAN_ATTRIBUTE, {key: plan})
    except AttributeError:  # a quant_state that takes no new attributes: prepared on every call
        pass
    return plan


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


def dequantize_nf4_checked(packed: torch.Tensor, quant_state, out_dtype: torch.dtype) -> None:
    """Raise the errors :func:`dequantize_nf4` would raise for these arguments, without dequantizing."""
    _check(packed, quant_state, out_dtype)


def dequantize_nf4_trusted(
    packed: torch.Tensor, quant_state, out_dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`dequantize_nf4` on the Triton path without its argument checks, for arguments that already passed
    them (:func:`dequantize_nf4_checked`): the fused LoRA functions dequantize each weight several times a step."""
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage may be another dtype over the same bytes
        packed = packed.contiguous().reshape(-1).view(torch.uint8)
    return dequantize_nf4_forward(packed, quant_state, out_dtype, out=out)


def dequantize_nf4(
    packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight (NF4, or FP4 through its code table), double quantization included.

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``: each value is
    ``code[index] * absmax[block]`` in float32, rounded once to ``out_dtype``. bitsandbytes is not imported;
    ``quant_state`` is read by attribute.

    Args:
        packed: (ceil(n / 2), 1) uint8, the ``.data`` of a ``Params4bit`` (two indices a byte, high nibble first).
        quant_state: a ``bitsandbytes.functional.QuantState`` (or any object with its attributes ``absmax``,
            ``shape``, ``code``, ``blocksize``, ``quant_type``, ``dtype``, ``nested``, ``offset`` and ``state2``
            with its own ``absmax``, ``code`` and ``blocksize``).
        out_dtype: bfloat16, float16 or float32; defaults to ``quant_state.dtype`` (to ``out``'s dtype with ``out``).
        out: optional contiguous tensor of ``quant_state.shape``'s size to write into (e.g. rows of a buffer that
            stacks several weights).

    Returns:
        weight: ``quant_state.shape`` (e.g. (out_features, in_features)), contiguous, in ``out_dtype``; ``out``
        itself when given.
    """
    if out_dtype is None:
        out_dtype = out.dtype if out is not None else getattr(quant_state, "dtype", None)
    packed = _check(packed, quant_state, out_dtype)
    if out is not None:
        numel = math.prod(tuple(quant_state.shape))
        if not isinstance(out, torch.Tensor) or out.dtype != out_dtype or out.numel() != numel:
            raise ValueError(f"out must be a {out_dtype} tensor of {numel} elements, got {getattr(out, 'shape', out)}.")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous (e.g. a block of rows of a contiguous buffer).")
        check_same_device(packed=packed, out=out)
    if use_triton(packed):
        return dequantize_nf4_forward(packed, quant_state, out_dtype, out=out)
    result = _reference.dequantize_nf4(packed, quant_state, out_dtype)
    return result if out is None else out.copy_(result.reshape(out.shape))
