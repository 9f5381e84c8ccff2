"""The float math of the cross-entropy kernel as Triton device functions: the logit transform (scaling,
soft-capping), the online log-sum-exp per lane and its combination, and one block of the logits gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def transform_logits(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The logits the loss sees: scaled (Cohere, Granite), then soft-capped (Gemma 2)."""
    if HAS_LOGIT_SCALE:
        x = x * logit_scale
    if HAS_SOFTCAP:
        # tanh(z) = 2 * sigmoid(2z) - 1: tl.math.tanh is missing in older Triton and in the interpreter.
        x = softcap * (2.0 * tl.sigmoid(2.0 * x * inv_softcap) - 1.0)
    return x


@triton.jit
def logits_gradient(x, cols, target_col, lse, w, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP):
    """d(w * loss)/dlogits of one float32 block: (softmax - onehot) times the chain rule of the transform.

    ``w`` already holds the row weight times ``logit_scale`` (the scaling's chain rule).
    """
    c = transform_logits(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
    p = tl.exp(c - lse)
    g = tl.where(cols == target_col, p - 1.0, p)
    if HAS_SOFTCAP:
        t = c * inv_softcap
        g = g * (1.0 - t * t)
    return g * w


@triton.jit
def online_lse_step(x, mask, m, d, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP):
    """Fold a float32 (lanes, cols) block into each lane's running maximum ``m`` and sum ``d`` of exp(logit - m).

    ``m`` and ``d`` have shape (lanes,). With a lane no wider than one warp's loads (32 threads x 16 bytes) the max
    and sum reduce within a warp: the warps of a program never wait for each other until :func:`combine_lanes`.
    """
    c = transform_logits(x, logit_scale, inv_softcap, softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
    c = tl.where(mask, c, float("-inf"))
    m_new = tl.maximum(m, tl.max(c, 1))
    # Keeps exp(-inf - -inf) = NaN away while a lane has seen only -inf (masked vocabulary entries).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(c - m_safe[:, None]), 1)
    return m_new, d


@triton.jit
def combine_lanes(m, d):
    """The log-sum-exp of a row from its lanes' running maxima ``m`` and sums ``d``."""
    top = tl.max(m, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(tl.sum(d * tl.exp(m - top_safe), 0))
