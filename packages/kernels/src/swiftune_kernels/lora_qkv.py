"""Fused LoRA q, k and v projections of one input, with a hand-written backward.

peft wraps q_proj, k_proj and v_proj separately, so autograd saves the layer input three times (once per
projection, plus each adapter's own copy of its input) and sums three dx. Here x is saved once, with the three
(T, r) adapter intermediates, and dx is accumulated into a single buffer:

    dx = dxa_q @ Aq + dxa_k @ Ak + dxa_v @ Av + dq @ Wq + dk @ Wk + dv @ Wv

in that order: the three rank-r terms are one thin matmul that writes dx, and the base matmuls accumulate onto it
(:func:`swiftune_kernels.lora_linear.lora_dx` says why the order matters). Likewise in forward, each output is
written first by its LoRA term and the base matmul adds onto it.

Each base weight (dense, or bitsandbytes 4-bit dequantized on the fly by the Triton NF4 kernel) is frozen and gets
no gradient. Same math as three :func:`swiftune_kernels.lora_linear.lora_linear` calls. Applies to peft LoRA layers
with dropout 0, no bias and no DoRA.

Two variants (:data:`CONFIG`): "separate" runs the three projections one after another (one dequantized weight
alive at a time); "fused" stacks the three adapters' A into one (sum r, hidden) matrix, so that x @ A.T, dA and
dxa @ A are one thin matmul each instead of three (each of the three reads or writes all of x or dx), and dequantizes
4-bit bases into one (q_out + k_out + v_out, hidden) buffer used by one base matmul in forward (q, k, v are then
column slices of one (tokens, q_out + k_out + v_out) output) and by the dx matmuls in backward, freed right after.
In "fused", the three LoRA terms of the forward are one thin matmul, through a block-diagonal (sum out, sum r) B.
"""

from __future__ import annotations

import torch

from swiftune_kernels.dispatch import use_triton
from swiftune_kernels.lora_linear import (
    AutocastPaused,
    adapter_operand,
    autocast_input,
    check_input,
    check_projection,
    lora_dx,
    materialize_weight,
    project_backward,
    project_forward,
    weight_shape,
)
from swiftune_kernels.reference import lora as _reference

_NAMES = ("q", "k", "v")
VARIANTS = ("separate", "fused")
# Default (one line to switch to a sweep's winner, benchmarks/sweep_kernels.py): the variant; for "fused",
# "dense_concat" also stacks dense (bf16) bases into one buffer (a copy of the three weights a pass) for one base
# matmul, and "dy_concat" copies dq, dk, dv side by side so that the base part of dx is one matmul, not three.
CONFIG = {"variant": "fused", "dense_concat": False, "dy_concat": True}


def _stacked_weight(weights, dtype: torch.dtype, device) -> torch.Tensor:
    """The three base weights as one (sum of out, hidden) buffer: 4-bit ones dequantized straight into its rows."""
    shapes = [weight_shape(w) for w in weights]
    buffer = torch.empty(sum(s[0] for s in shapes), shapes[0][1], dtype=dtype, device=device)
    start = 0
    for w, (rows, _) in zip(weights, shapes, strict=True):
        materialize_weight(w, dtype, out=buffer[start : start + rows])
        start += rows
    return buffer


def _bounds(sizes) -> list[slice]:
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _fused_forward(ctx, x2, adapters, weights, scales):
    a_cat = torch.cat([a for a, _ in adapters])  # (sum r, hidden)
    xa = torch.mm(x2, a_cat.t())
    outs_n = [weight_shape(w)[0] for w in weights]
    cols, ranks = _bounds(outs_n), _bounds([a.shape[0] for a, _ in adapters])
    stack = CONFIG["dense_concat"] or any(_reference.is_quantized(w) for w in weights)
    # The three LoRA terms first, each a write-only thin matmul into its columns of y (beta=0: the fresh y is not
    # read; alpha=s: no scaling pass); the base matmuls then accumulate onto y with beta=1, reading y in their
    # epilogue (see lora_linear.lora_dx). A column slice of the row-major y is a valid GEMM output (unit column
    # stride, ldc = y's row stride): the matmuls write straight into y.
    y = x2.new_empty(x2.shape[0], sum(outs_n))
    for (_, b), s, col, rank in zip(adapters, scales, cols, ranks, strict=True):
        y[:, col].addmm_(xa[:, rank], b.t(), beta=0, alpha=s)
    if stack:
        w_cat = _stacked_weight(weights, x2.dtype, x2.device)
        y.addmm_(x2, w_cat.t())
        del w_cat
    else:
        for w, col in zip(weights, cols, strict=True):
            y[:, col].addmm_(x2, materialize_weight(w, x2.dtype).t())
    ctx.save_for_backward(x2, xa, a_cat, *(b for _, b in adapters))
    ctx.cols, ctx.ranks, ctx.stack = cols, ranks, stack
    return [y[:, col] for col in cols]


def _fused_backward(ctx, dys):
    x2, xa, a_cat, *bs = ctx.saved_tensors
    need_x, need = ctx.needs_input_grad[0], ctx.needs_input_grad[1:7]
    need_a, need_b = any(need[0::2]), need[1::2]
    dys = [dy.reshape(-1, dy.shape[-1]) for dy in dys]
    dxa = None
    if need_a or need_x:
        dxa = torch.empty(x2.shape[0], a_cat.shape[0], dtype=x2.dtype, device=x2.device)
        for dy, b, s, rank in zip(dys, bs, ctx.scales, ctx.ranks, strict=True):
            dxa[:, rank].addmm_(dy, b, beta=0, alpha=s)
    dbs = [
        xa.new_empty(dy.shape[1], rank.stop - rank.start).addmm_(dy.t(), xa[:, rank], beta=0, alpha=s) if nb else None
        for dy, s, rank, nb in zip(dys, ctx.scales, ctx.ranks, need_b, strict=True)
    ]
    da_cat = torch.mm(dxa.t(), x2) if need_a else None
    das = [da_cat[rank] if na else None for rank, na in zip(ctx.ranks, need[0::2], strict=True)]
    dx = None
    if need_x:
        # dx = dxa @ a_cat first (one thin write-only matmul), then the base term(s) accumulate onto it
        if ctx.stack:
            w_cat = _stacked_weight(ctx.weights, x2.dtype, x2.device)
            if CONFIG["dy_concat"]:
                base = [(torch.cat(dys, dim=1), w_cat)]
            else:
                base = [(dy, w_cat[col]) for dy, col in zip(dys, ctx.cols, strict=True)]
            dx = lora_dx([(dxa, a_cat)], base)
            del w_cat, base
        else:
            dx = lora_dx([(dxa, a_cat)], zip(dys, ctx.weights, strict=True))
        dx = dx.reshape(ctx.x_shape)
    # in x's dtype: the engine casts them to the adapters' (LoRALinearFunction.backward)
    return dx, [grad for pair in zip(das, dbs, strict=True) for grad in pair]


class LoRAQKVFunction(torch.autograd.Function):
    """Autograd of the q, k, v LoRA projections of one x; saves x once and three (T, r) intermediates."""

    @staticmethod
    def forward(ctx, x, q_a, q_b, k_a, k_b, v_a, v_b, q_w, k_w, v_w, q_s, k_s, v_s, variant="separate"):
        x2 = x.reshape(-1, x.shape[-1])
        adapters = [
            (adapter_operand(a, x.dtype), adapter_operand(b, x.dtype)) for a, b in ((q_a, q_b), (k_a, k_b), (v_a, v_b))
        ]
        ctx.weights, ctx.scales, ctx.x_shape = (q_w, k_w, v_w), (q_s, k_s, v_s), x.shape
        ctx.variant = variant
        if variant == "fused":
            outs = _fused_forward(ctx, x2, adapters, ctx.weights, ctx.scales)
            return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in outs)
        outs, xas = [], []
        for (a_, b_), w, s in zip(adapters, ctx.weights, ctx.scales, strict=True):
            y, xa = project_forward(x2, w, a_, b_, s)
            outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
            xas.append(xa)
        ctx.save_for_backward(x2, *xas, *(t for pair in adapters for t in pair))
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        if ctx.variant == "fused":
            dx, grads = _fused_backward(ctx, (dq, dk, dv))
            return (dx, *grads, None, None, None, None, None, None, None)
        x2, *rest = ctx.saved_tensors
        xas, ab = rest[:3], rest[3:]
        need_x = ctx.needs_input_grad[0]
        grads, rank_terms, dys = [], [], []
        for i, dy in enumerate((dq, dk, dv)):
            a_, b_ = ab[2 * i], ab[2 * i + 1]
            need_a, need_b = ctx.needs_input_grad[1 + 2 * i], ctx.needs_input_grad[2 + 2 * i]
            dy2 = dy.reshape(-1, dy.shape[-1])
            da, db, dxa = project_backward(dy2, x2, xas[i], a_, b_, ctx.scales[i], need_a, need_b, need_x)
            rank_terms.append((dxa, a_))
            dys.append(dy2)
            grads += [da, db]
        # the three rank-r terms in one thin matmul that writes dx, then the three base matmuls, one weight at a time
        dx = lora_dx(rank_terms, zip(dys, ctx.weights, strict=True)).reshape(ctx.x_shape) if need_x else None
        return (dx, *grads, None, None, None, None, None, None, None)


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
    x = autocast_input(x, (q_w, k_w, v_w))
    projections = ((q_w, q_a, q_b, q_s), (k_w, k_a, k_b, k_s), (v_w, v_a, v_b, v_s))
    for name, (w, a, b, s) in zip(_NAMES, projections, strict=True):
        check_projection(f"{name}_", x, w, a, b, s, x.shape[-1])
    if use_triton(x):
        variant = CONFIG["variant"]
        assert variant in VARIANTS, variant
        scales = (float(q_s), float(k_s), float(v_s))
        with AutocastPaused(x):
            return LoRAQKVFunction.apply(x, q_a, q_b, k_a, k_b, v_a, v_b, q_w, k_w, v_w, *scales, variant)
    return _reference.lora_qkv(x, q_w, q_a, q_b, q_s, k_w, k_a, k_b, k_s, v_w, v_a, v_b, v_s)
