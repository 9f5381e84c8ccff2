"""llama.cpp's K-quants (Q4_K, Q5_K, Q6_K) encoded in vectorized numpy, because gguf's ``quantize`` lacks them.

A super-block holds 256 consecutive values of a row.

- Q4_K / Q5_K: 8 sub-blocks of 32, each x ~= d*sc[j] * q - dmin*m[j] with q in [0, 15] (Q5_K: [0, 31]); the
  sub-block scales sc and mins m are 6-bit integers, scaled by two fp16 super-block factors d and dmin.
  Bytes: d, dmin (fp16), 12 bytes of packed 6-bit scales and mins, (Q5_K: 32 bytes of 5th bits), 128 of nibbles.
- Q6_K: 16 sub-blocks of 16, each x ~= d*sc[j] * (q - 32) with q in [0, 63] and sc an int8.
  Bytes: 128 of low nibbles, 64 of 2-bit high parts, 16 int8 scales, d (fp16).

Each sub-block's scale (and min) is chosen by trying a few scales around the plain range/levels one and keeping
the least-squares best, as llama.cpp's reference quantizer does; the values are then requantized against the
scale actually stored, so that rounding of the 6-bit (or int8) scales is not added twice. The byte layouts were
written against gguf's ``dequantize`` (llama.cpp's reading order), which is the test oracle.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK_K = 256
# Blocks per numpy pass: bounds the temporaries (~4 MiB per float32 array and thread) whatever the tensor size.
_CHUNK_BLOCKS = 4096


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """Encode a float array whose last dimension is a multiple of 256 as Q4_K (144 bytes per 256 values)."""
    return _quantize(array, _q4_k_blocks, 144)


def quantize_q5_k(array: np.ndarray) -> np.ndarray:
    """Encode a float array whose last dimension is a multiple of 256 as Q5_K (176 bytes per 256 values)."""
    return _quantize(array, _q5_k_blocks, 176)


def quantize_q6_k(array: np.ndarray) -> np.ndarray:
    """Encode a float array whose last dimension is a multiple of 256 as Q6_K (210 bytes per 256 values)."""
    return _quantize(array, _q6_k_blocks, 210)


def _quantize(array: np.ndarray, encode, type_size: int) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 0 or array.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows whose length is a multiple of {QK_K}; got shape {array.shape}.")
    blocks = array.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)

    def encode_chunk(start: int) -> None:
        out[start : start + _CHUNK_BLOCKS] = encode(blocks[start : start + _CHUNK_BLOCKS])

    starts = range(0, blocks.shape[0], _CHUNK_BLOCKS)
    if len(starts) == 1:
        encode_chunk(0)
    else:
        # numpy releases the GIL in its array loops, so threads over chunks use every core.
        with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(encode_chunk, starts))
    return out.reshape(*array.shape[:-1], array.shape[-1] // QK_K * type_size)


def _fp16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp16 bytes (n, 2) of ``values`` and the float32 value they hold (what a reader will use)."""
    half = values.astype(np.float16)
    return half.view(np.uint8).reshape(-1, 2), half.astype(np.float32)


def _fit_affine(x: np.ndarray, levels: int, steps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (last axis) scale >= 0 and min <= 0 such that x ~= scale * q + min, q in [0, levels].

    Tries inverse scales (levels - 1 + 0.1 k) / range for k = 0..steps, refits scale and min by least squares
    on each candidate's q, and keeps the smallest squared error. The error of a fit comes from the sums the fit
    already has (sum (s q + o - x)^2 expanded). The work runs on the transposed values (32 rows, one column per
    sub-block), so that every per-sub-block factor broadcasts along contiguous rows and every sum adds whole rows.
    """
    shape = x.shape[:-1]
    xt = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    count = xt.shape[0]
    low = np.minimum(xt.min(axis=0), 0.0)
    span = xt.max(axis=0) - low
    span = np.where(span > 0, span, 1.0)
    shifted = xt - low
    sum_x = xt.sum(axis=0)
    sum_xx = np.einsum("ij,ij->j", xt, xt)
    best_scale, best_min = span / levels, low
    best_err = np.full(low.shape, np.inf, dtype=np.float32)
    q = np.empty_like(xt)
    product = np.empty_like(xt)
    for k in range(steps + 1):
        np.multiply(shifted, (levels - 1.0 + 0.1 * k) / span, out=q)
        np.rint(q, out=q)
        np.clip(q, 0, levels, out=q)
        sum_q = q.sum(axis=0)
        sum_qq = np.multiply(q, q, out=product).sum(axis=0)
        sum_qx = np.multiply(q, xt, out=product).sum(axis=0)
        det = count * sum_qq - sum_q * sum_q
        safe_det = np.where(det > 0, det, 1.0)
        scale = np.where(det > 0, (count * sum_qx - sum_q * sum_x) / safe_det, 0.0)
        offset = np.where(det > 0, (sum_qq * sum_x - sum_q * sum_qx) / safe_det, low)
        # The format stores a min that is subtracted (offset <= 0): refit the scale alone when the fit wants more.
        positive = offset > 0
        scale = np.where(positive, sum_qx / np.where(sum_qq > 0, sum_qq, 1.0), scale)
        offset = np.where(positive, 0.0, offset)
        err = (
            scale * scale * sum_qq
            + 2 * scale * offset * sum_q
            - 2 * scale * sum_qx
            + count * offset * offset
            - 2 * offset * sum_x
            + sum_xx
        )
        better = (err < best_err) & (scale > 0)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, offset, best_min)
    return best_scale.reshape(shape), -best_min.reshape(shape)


def _six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize non-negative per-sub-block values (n, 8) to 6 bits: (fp16 bytes, fp16 factor, integers)."""
    factor_bytes, factor = _fp16(values.max(axis=1) / 63.0)
    safe = np.where(factor > 0, factor, 1.0)[:, None]
    ints = np.clip(np.rint(values / safe), 0, 63).astype(np.uint8)
    return factor_bytes, factor, ints


def _pack_scales_mins(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins into 12 bytes: sub-blocks 0-3 whole in bytes 0-7 (with the top two
    bits of sub-blocks 4-7 above them), the low four bits of sub-blocks 4-7 in bytes 8-11."""
    packed = np.empty((sc.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return packed


def _affine_codes(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The shared part of Q4_K and Q5_K: header bytes (d, dmin, scales) and codes q (n, 8, 32) in [0, levels]."""
    x = blocks.reshape(-1, 8, 32)
    scale, minimum = _fit_affine(x, levels)
    d_bytes, d, sc = _six_bit(scale)
    dmin_bytes, dmin, mn = _six_bit(minimum)
    step = d[:, None] * sc
    offset = dmin[:, None] * mn
    safe = np.where(step > 0, step, 1.0)
    q = np.where(step[..., None] > 0, np.rint((x + offset[..., None]) / safe[..., None]), 0)
    q = np.clip(q, 0, levels).astype(np.uint8)
    return np.concatenate([d_bytes, dmin_bytes, _pack_scales_mins(sc, mn)], axis=1), q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """128 bytes per block: each 64 values take 32 bytes, the first 32 values in the low nibbles."""
    pairs = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    header, q = _affine_codes(blocks, 15)
    return np.concatenate([header, _nibbles(q)], axis=1)


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    header, q = _affine_codes(blocks, 31)
    # Bit j of byte i is the fifth bit of value i of sub-block j.
    fifth = ((q >> 4) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(fifth, axis=1)
    return np.concatenate([header, qh, _nibbles(q)], axis=1)


def _fit_symmetric(x: np.ndarray, steps: int = 9) -> np.ndarray:
    """Per sub-block (last axis) signed scale such that x ~= scale * q, q in [-32, 31].

    The candidates map the largest-magnitude value to -(32 + 0.1 k), k = -steps..steps (the negative side has the
    extra level); each is refit by least squares and the smallest squared error is kept. Transposed as in
    ``_fit_affine``.
    """
    shape = x.shape[:-1]
    xt = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    idx = np.abs(xt).argmax(axis=0)
    extreme = xt[idx, np.arange(xt.shape[1])]
    safe = np.where(extreme != 0, extreme, 1.0)
    best_scale = np.zeros(extreme.shape, dtype=np.float32)
    best_err = np.full(extreme.shape, np.inf, dtype=np.float32)
    sum_xx = np.einsum("ij,ij->j", xt, xt)
    q = np.empty_like(xt)
    product = np.empty_like(xt)
    for k in range(-steps, steps + 1):
        np.multiply(xt, -(32.0 + 0.1 * k) / safe, out=q)
        np.rint(q, out=q)
        np.clip(q, -32, 31, out=q)
        sum_qq = np.multiply(q, q, out=product).sum(axis=0)
        sum_qx = np.multiply(q, xt, out=product).sum(axis=0)
        scale = np.where(sum_qq > 0, sum_qx / np.where(sum_qq > 0, sum_qq, 1.0), 0.0)
        err = sum_xx - scale * sum_qx
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    return best_scale.reshape(shape)


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 16, 16)
    scale = _fit_symmetric(x)
    d_bytes, d = _fp16(np.abs(scale).max(axis=1) / 127.0)
    safe_d = np.where(d > 0, d, 1.0)[:, None]
    sc = np.clip(np.rint(scale / safe_d), -127, 127).astype(np.int8)
    step = d[:, None] * sc
    safe = np.where(step != 0, step, 1.0)
    q = np.where(step[..., None] != 0, np.rint(x / safe[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    # Per half of 128 values: value r's low nibble is in byte r % 64 (high nibble when r >= 64), its top two bits
    # in byte r % 32 at bit 2 * (r // 32).
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    qh = np.bitwise_or.reduce(high, axis=2).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d_bytes], axis=1)
