"""Fused LoRA q, k and v projections of one input, with a hand-written backward.

peft wraps q_proj, k_proj and v_proj separately, so autograd saves the layer input three times (once per
projection, plus each adapter's own copy of its input) and sums three dx. Here x is saved once, with the three
(T, r) adapter intermediates, and dx is accumulated into a single buffer:

    dx = dq @ Wq + dk @ Wk + dv @ Wv + dxa_q @ Aq + dxa_k @ Ak + dxa_v @ Av

Each base weight (dense, or bitsandbytes 4-bit dequantized on the fly by the Triton NF4 kernel, one at a time) is
frozen and gets no gradient. Same math as three :func:`swiftune_kernels.lora_linear.lora_linear` calls.
Applies to peft LoRA layers with dropout 0, no bias and no DoRA.
"""

from __future__ import annotations

import torch

from swiftune_kernels.dispatch import use_triton
from swiftune_kernels.lora_linear import (
    accumulate_dx,
    cast_grad,
    check_input,
    check_projection,
    project_backward,
    project_forward,
)
from swiftune_kernels.reference import lora as _reference

_NAMES = ("q", "k", "v")


class LoRAQKVFunction(torch.autograd.Function):
    """Autograd of the q, k, v LoRA projections of one x; saves x once and three (T, r) intermediates."""

    @staticmethod
    def forward(ctx, x, q_a, q_b, k_a, k_b, v_a, v_b, q_w, k_w, v_w, q_s, k_s, v_s):
        x2 = x.reshape(-1, x.shape[-1])
        adapters = [(a.to(x.dtype), b.to(x.dtype)) for a, b in ((q_a, q_b), (k_a, k_b), (v_a, v_b))]
        outs, xas = [], []
        for (a_, b_), w, s in zip(adapters, (q_w, k_w, v_w), (q_s, k_s, v_s), strict=True):
            y, xa = project_forward(x2, w, a_, b_, s)
            outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
            xas.append(xa)
        ctx.save_for_backward(x2, *xas, *(t for pair in adapters for t in pair))
        ctx.weights, ctx.scales, ctx.x_shape = (q_w, k_w, v_w), (q_s, k_s, v_s), x.shape
        ctx.dtypes = tuple(t.dtype for t in (q_a, q_b, k_a, k_b, v_a, v_b))
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, *rest = ctx.saved_tensors
        xas, ab = rest[:3], rest[3:]
        need_x = ctx.needs_input_grad[0]
        grads, dx = [], None
        for i, dy in enumerate((dq, dk, dv)):
            a_, b_ = ab[2 * i], ab[2 * i + 1]
            need_a, need_b = ctx.needs_input_grad[1 + 2 * i], ctx.needs_input_grad[2 + 2 * i]
            dy2 = dy.reshape(-1, dy.shape[-1])
            da, db, dxa = project_backward(dy2, x2, xas[i], a_, b_, ctx.scales[i], need_a, need_b, need_x)
            if need_x:
                dx = accumulate_dx(dx, dy2, ctx.weights[i], dxa, a_)
            grads += [cast_grad(da, ctx.dtypes[2 * i]), cast_grad(db, ctx.dtypes[2 * i + 1])]
        dx = dx.reshape(ctx.x_shape) if need_x else None
        return (dx, *grads, None, None, None, None, None, None)


def lora_qkv(
    x: torch.Tensor,
    q_w,
    q_a: torch.Tensor,
    q_b: torch.Tensor,
    q_s: float,
    k_w,
    k_a: torch.Tensor,
    k_b: torch.Tensor,
    k_s: float,
    v_w,
    v_a: torch.Tensor,
    v_b: torch.Tensor,
    v_s: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA q, k and v projections of one input (peft layout), gradients for x and the adapters only.

    For each projection p: ``p = x @ Wp.T + sp * (x @ Ap.T) @ Bp.T``.

    Args:
        x: (..., hidden), float16, bfloat16, float32 (or float64).
        q_w: (q_out, hidden) frozen base weight in x's dtype, or a bitsandbytes 4-bit weight (``.data`` packed
            uint8 and ``.quant_state``); likewise ``k_w`` (kv_out, hidden) and ``v_w``.
        q_a: (r, hidden), peft's ``lora_A.weight``; ``k_a``, ``v_a`` likewise (their ranks may differ).
        q_b: (q_out, r), peft's ``lora_B.weight``; ``k_b``, ``v_b`` likewise.
        q_s: peft's ``scaling`` of q_proj; ``k_s``, ``v_s`` likewise.

    Returns:
        (q, k, v): (..., q_out), (..., k_out), (..., v_out) in x's dtype.
    """
    check_input(x)
    projections = ((q_w, q_a, q_b, q_s), (k_w, k_a, k_b, k_s), (v_w, v_a, v_b, v_s))
    for name, (w, a, b, s) in zip(_NAMES, projections, strict=True):
        check_projection(f"{name}_", x, w, a, b, s, x.shape[-1])
    if use_triton(x):
        return LoRAQKVFunction.apply(x, q_a, q_b, k_a, k_b, v_a, v_b, q_w, k_w, v_w, float(q_s), float(k_s), float(v_s))
    return _reference.lora_qkv(x, q_w, q_a, q_b, q_s, k_w, k_a, k_b, k_s, v_w, v_a, v_b, v_s)
