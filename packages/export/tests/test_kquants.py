"""K-quants: gguf's dequantize (llama.cpp's reading of the bytes) must give back the weights within the format's bound.

Bound, derived per sub-block j of a b-bit format with L = 2**b - 1 levels: an affine grid spanning the sub-block's
range r_j has step s_j = r_j / L, so rounding to it errs by at most s_j / 2 per value (RMS s_j / sqrt(12) for spread
values). The stored scale and min are themselves rounded: a 6-bit integer times the super-block factor
d = max_k s_k / 63 (dmin = max_k min_k / 63), which moves the top of the grid by up to L * d / 2 and the grid by
dmin / 2 (Q6_K: int8 scales, d = max_k |scale_k| / 127, 32 levels per side). The scale search trades clipping an
extreme value for a finer grid when that lowers the squared error; the test allows it 1.5 steps. So the largest error
must stay under 1.5 s_j + (L d + dmin) / 2 and the RMS error under the RMS of s_j / 2. Q6_K is symmetric with
s_j = max|x| / 32.
"""

import gguf
import numpy as np
import pytest

from swiftune_export import kquants

Q = gguf.GGMLQuantizationType
ENCODERS = {Q.Q4_K: (kquants.quantize_q4_k, 4, 32), Q.Q5_K: (kquants.quantize_q5_k, 5, 32)}


def _weights(rows=64, cols=1024, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    w[3, 5] = 0.4  # an outlier, as real weights have
    w[rows - 1] += 0.03  # a row that is not centred
    return w


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K])
def test_affine_kquants_within_bound(qtype):
    encode, bits, sub = ENCODERS[qtype]
    w = _weights()
    blocks = encode(w)
    assert blocks.dtype == np.uint8 and blocks.shape == (64, 1024 // 256 * gguf.GGML_QUANT_SIZES[qtype][1])
    back = gguf.quants.dequantize(blocks, qtype)
    sub_w, sub_err = w.reshape(-1, sub), (back - w).reshape(-1, sub)
    levels = 2**bits - 1
    minimum = -np.minimum(sub_w.min(1), 0)
    step = (sub_w.max(1) + minimum) / levels
    per_super = 256 // sub
    d = np.repeat(step.reshape(-1, per_super).max(1) / 63, per_super)
    dmin = np.repeat(minimum.reshape(-1, per_super).max(1) / 63, per_super)
    assert np.all(np.abs(sub_err).max(1) <= 1.5 * step + (levels * d + dmin) / 2)
    assert _rms(sub_err) <= _rms(step) / 2


def test_q6_k_within_bound():
    w = _weights()
    back = gguf.quants.dequantize(kquants.quantize_q6_k(w), Q.Q6_K)
    sub_w, sub_err = w.reshape(-1, 16), (back - w).reshape(-1, 16)
    step = np.abs(sub_w).max(1) / 32
    d = np.repeat(step.reshape(-1, 16).max(1) / 127, 16)
    assert np.all(np.abs(sub_err).max(1) <= 1.5 * step + 32 * d / 2)
    assert _rms(sub_err) <= _rms(step) / 2


def test_kquants_beat_the_simple_quants_of_the_same_bits():
    w = _weights(seed=1)

    def error(qtype, encoded):
        return _rms(gguf.quants.dequantize(encoded, qtype) - w) / _rms(w)

    q4_0 = error(Q.Q4_0, gguf.quants.quantize(w, Q.Q4_0))
    q4_k = error(Q.Q4_K, kquants.quantize_q4_k(w))
    q5_0 = error(Q.Q5_0, gguf.quants.quantize(w, Q.Q5_0))
    q5_k = error(Q.Q5_K, kquants.quantize_q5_k(w))
    q6_k = error(Q.Q6_K, kquants.quantize_q6_k(w))
    q8_0 = error(Q.Q8_0, gguf.quants.quantize(w, Q.Q8_0))
    assert q4_k < q4_0 and q5_k < q5_0
    assert q8_0 < q6_k < q5_k < q4_k
    assert q4_k < 0.08 and q6_k < 0.02  # measured 0.072 and 0.018 on Gaussian weights


@pytest.mark.parametrize(
    "encode,qtype",
    [
        (kquants.quantize_q4_k, Q.Q4_K),
        (kquants.quantize_q5_k, Q.Q5_K),
        (kquants.quantize_q6_k, Q.Q6_K),
    ],
)
def test_degenerate_blocks(encode, qtype):
    w = np.zeros((4, 256), dtype=np.float32)
    w[1] = 0.5  # constant positive
    w[2] = -0.25  # constant negative
    w[3, :128] = np.linspace(-1, 0, 128)  # half zeros, all non-positive
    back = gguf.quants.dequantize(encode(w), qtype)
    assert np.all(np.isfinite(back))
    assert np.array_equal(back[0], w[0])
    np.testing.assert_allclose(back, w, atol=1 / 32)


def test_3d_arrays_and_bad_rows():
    w = _weights(rows=6, cols=512).reshape(2, 3, 512)
    assert kquants.quantize_q4_k(w).shape == (2, 3, 2 * 144)
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize_q6_k(np.zeros((2, 100), dtype=np.float32))
