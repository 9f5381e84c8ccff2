"""Pure-torch NF4 (bitsandbytes 4-bit) dequantization: the oracle and CPU fallback of ``swiftune_kernels.nf4``.

bitsandbytes' 4-bit format (``quantize_4bit``), for a weight of ``n = prod(shape)`` elements walked in row-major
order:

- element ``i`` belongs to block ``i // blocksize``; each block has one float32 scale ``absmax[block]``;
- element ``i`` is a 4-bit index into a 16-entry float32 table ``code`` (NF4: normal-distribution quantiles in
  [-1, 1]); two indices share one byte of ``packed``, element ``2j`` in the HIGH nibble of byte ``j`` and element
  ``2j + 1`` in the low nibble (an odd ``n`` leaves the last low nibble unused);
- ``w[i] = code[index[i]] * absmax[i // blocksize]`` in float32, rounded once to the output dtype.

Double quantization (``compress_statistics=True``, ``quant_state.nested``): the absmax vector is itself stored as
uint8 indices into a 256-entry float32 table ``state2.code``, in blocks of ``state2.blocksize`` (256) with float32
scales ``state2.absmax``, after subtracting their mean ``offset``:
``absmax[b] = (state2.code[qabsmax[b]] * state2.absmax[b // state2.blocksize]) + offset``, each operation rounded to
float32 (bitsandbytes runs the product and the sum as two separate ops, so there is no fused multiply-add).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) with equal probability mass, scaled to [-1, 1].
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclass
class QuantState:
    """The attributes of ``bitsandbytes.functional.QuantState`` that dequantization reads (duck-typed twin)."""

    absmax: torch.Tensor
    shape: torch.Size | None = None
    code: torch.Tensor | None = None
    blocksize: int = 64
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.float32
    offset: torch.Tensor | None = None
    state2: QuantState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


def block_absmax(quant_state) -> torch.Tensor:
    """The float32 per-block scales of a 4-bit weight, undoing double quantization when there is one."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    q = quant_state.absmax.reshape(-1).long()
    scale2 = state2.absmax.float().repeat_interleave(state2.blocksize)[: q.numel()]
    return state2.code.float()[q] * scale2 + quant_state.offset.float()


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` 4-bit indices of ``packed`` (uint8), high nibble first, as int64."""
    flat = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel]


def dequantize_nf4(packed: torch.Tensor, quant_state, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``code[index] * absmax[block]`` in float32 (float64 for a float64 out_dtype), shaped ``quant_state.shape``."""
    out_dtype = quant_state.dtype if out_dtype is None else out_dtype
    shape = tuple(quant_state.shape)
    numel = math.prod(shape)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    values = quant_state.code.float()[unpack_nibbles(packed, numel)]
    scales = block_absmax(quant_state).repeat_interleave(quant_state.blocksize)[:numel]
    return (values.to(compute) * scales.to(compute)).to(out_dtype).reshape(shape)


def _nearest_level(values: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of an ascending table (bucketize on the midpoints, as bitsandbytes' torch backend)."""
    return torch.bucketize(values, (sorted_code[1:] + sorted_code[:-1]) / 2)


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, compress_statistics: bool = False, nested_blocksize: int = 256
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` to bitsandbytes' NF4 layout, for tests that run without bitsandbytes.

    Follows bitsandbytes' pure-torch backend: each block is divided by its absmax, each value rounded to the
    nearest NF4 level; with ``compress_statistics`` the absmax vector minus its mean is quantized blockwise to
    256 levels (a sorted uniform table here, where bitsandbytes uses its "dynamic" map: the dequantization math is
    the same for any table).

    Returns:
        packed: (ceil(n / 2), 1) uint8, high nibble first.
        quant_state: a :class:`QuantState`.
    """
    flat = weight.reshape(-1).float()
    numel = flat.numel()
    n_blocks = -(-numel // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - numel)).reshape(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1).reshape(-1)[:numel]
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=weight.device)
    index = _nearest_level(scaled, code)
    if numel % 2:
        index = torch.cat([index, index.new_zeros(1)])
    index = index.to(torch.uint8)
    packed = ((index[0::2] << 4) | index[1::2]).unsqueeze(1)
    state = QuantState(absmax=absmax, shape=weight.shape, code=code, blocksize=blocksize, dtype=weight.dtype)
    if compress_statistics:
        offset = absmax.mean()
        centred = absmax - offset
        n2 = -(-centred.numel() // nested_blocksize)
        pad2 = torch.nn.functional.pad(centred, (0, n2 * nested_blocksize - centred.numel()))
        absmax2 = pad2.reshape(n2, nested_blocksize).abs().amax(dim=1).clamp(min=1e-38)
        code2 = torch.linspace(-1.0, 1.0, 256, dtype=torch.float32, device=weight.device)
        normed = centred / absmax2.repeat_interleave(nested_blocksize)[: centred.numel()]
        qabsmax = _nearest_level(normed, code2).to(torch.uint8)
        state.absmax = qabsmax
        state.offset = offset
        state.state2 = QuantState(absmax=absmax2, code=code2, blocksize=nested_blocksize, dtype=torch.float32)
    return packed, state
