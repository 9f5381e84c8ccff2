"""Fused LoRA gated MLP ``down(act(gate(x)) * up(x))`` with a hand-written backward and in-place buffers.

Each of gate, up and down is a LoRA projection ``x @ W.T + s * (x @ A.T) @ B.T`` (peft layout) over a frozen
base weight, dense or bitsandbytes 4-bit (dequantized on the fly by the Triton NF4 kernel in forward and again in
backward, one weight at a time, never kept). Forward saves x, the gate and up pre-activations (T x I each) and the
three (T x r) adapter intermediates; h = act(gate) * up (the gated_activation kernel) is not kept.

Backward, with dh = dy @ Wd + s_d * (dy @ Bd) @ Ad:

1. one Triton pass (``_lora_mlp_act_bwd_kernel``) reads dh, gate and up and writes, IN PLACE, h over dh, dgate
   over gate and dup over up: no (T x I) buffer is allocated beyond dh, where eager autograd keeps gate, act(gate),
   up and h and allocates dgate, dup, dh. The saved gate and up are therefore consumed: a second backward through
   the same graph (``retain_graph=True``) raises instead of returning wrong gradients.
2. dA_d = (s_d dy @ Bd).T @ h; gate and up: dB = s dgate.T @ xa, dA = (s dgate @ B).T @ x; dx accumulates
   dgate @ Wg + dup @ Wu + the two adapter terms in one buffer.

In every projection (and in dh and dx) the rank-r terms are written first by one thin matmul and the base matmuls
accumulate onto them (:func:`swiftune_kernels.lora_linear.lora_dx` says why the order matters).

Token tiling, for very long sequences: the MLP is per token, so at T tokens where one (T x I) buffer would pass
``TILE_BYTES`` (a 400k-token Llama-3.1-8B sequence: 11 GiB each for gate, up and dh), or when ``tile_tokens`` asks,
it runs in tiles of rows. Forward then saves only x and the adapter casts (no T x I buffer, no intermediate) and
computes y tile by tile; backward recomputes each tile's gate and up (with their adapter intermediates) and runs
the same steps as above on the tile's rows, writing the tile's rows of dx and summing the adapter gradients in
float32. The price is gate and up computed once more per backward (two of the MLP's three base matmuls) in a layer
that was not checkpointed; in a checkpointed layer nothing is added, since its recompute (``output_needed=False``)
computes nothing in a tiled forward. Peak (T x I) memory is about three tiles (gate, up and dh of one tile).

float64 inputs (tests) run the same steps with the activation written in torch. Applies to peft LoRA layers with
dropout 0, no bias and no DoRA.
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from swiftune_kernels.dispatch import use_triton
from swiftune_kernels.gated_activation import _ACTIVATION_IDS, _activation_and_grad, gated_activation_forward
from swiftune_kernels.lora_linear import (
    AutocastPaused,
    adapter_operand,
    autocast_input,
    check_input,
    check_projection,
    lora_dx,
    project_backward,
    project_forward,
    weight_shape,
)
from swiftune_kernels.recompute_parking import park_destination, park_for_recompute, parking_in_forward, take_parked
from swiftune_kernels.reference import lora as _reference
from swiftune_kernels.reference.gated_activation import gated_activation as _reference_gated_activation


@triton.jit
def _lora_mlp_act_bwd_kernel(
    dh_ptr,
    gate_ptr,
    up_ptr,
    numel,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # every element is read before it is overwritten by the same program, so the in-place stores are safe
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _activation_and_grad(g, ACTIVATION)
    tl.store(dh_ptr + offs, act * u, mask=mask)  # h, for dA of down
    tl.store(gate_ptr + offs, dh * u * d_act, mask=mask)  # dgate
    tl.store(up_ptr + offs, dh * act, mask=mask)  # dup


_BLOCK_SIZE = 1024  # 8 elements a thread at 4 warps: 16-byte accesses in bf16, as the gated_activation kernels
_NUM_WARPS = 4


def lora_mlp_act_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    """In place: dh <- act(gate) * up, gate <- dh * up * act'(gate), up <- dh * act(gate). Contiguous, same shape."""
    assert dh.is_contiguous() and gate.is_contiguous() and up.is_contiguous()
    assert dh.shape == gate.shape == up.shape and dh.dtype == gate.dtype == up.dtype
    if dh.dtype == torch.float64:  # no Triton float64 path: the same math in torch, written into the same buffers
        act, d_act = _reference.activation_and_grad(gate, activation)
        dgate, dup, h = dh * up * d_act, dh * act, act * up
        gate.copy_(dgate), up.copy_(dup), dh.copy_(h)
        return
    numel = dh.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(numel, _BLOCK_SIZE),)
    _lora_mlp_act_bwd_kernel[grid](
        dh, gate, up, numel, ACTIVATION=_ACTIVATION_IDS[activation], BLOCK_SIZE=_BLOCK_SIZE, num_warps=_NUM_WARPS
    )


def _act_forward(gate: torch.Tensor, up: torch.Tensor, activation: str, in_place: bool = False) -> torch.Tensor:
    """act(gate) * up; with ``in_place``, written over gate where the kernel runs (gate is then h)."""
    return _act_forward_over(gate if in_place else None, gate, up, activation)


def _act_forward_over(over: torch.Tensor | None, gate: torch.Tensor, up: torch.Tensor, activation: str):
    """act(gate) * up, written over ``over`` (gate or up, or None: a new tensor) where the kernel runs."""
    if gate.dtype == torch.float64:
        return _reference_gated_activation(gate, up, activation)
    return gated_activation_forward(
        gate, up, activation, out=over if over is not None and over.is_contiguous() else None
    )


# Automatic tiling bound: tile when one (T x I) buffer (gate, up, dh) would be larger. At 1 GiB a tile of a Llama-8B
# MLP (I = 14336, bf16) is 37k rows, each base matmul of a tile tens of TFLOPs: enough to keep the GPU busy, so the
# per-tile costs (a few launches, one more NF4 dequantization per weight and tile) stay far below 1%; and the three
# tile buffers alive at once in backward (about 3 GiB) leave room beside a 400k-token sequence's other buffers.
# Sequences below the bound (16k tokens of Llama-8B: 0.45 GiB) run untiled, on the fast path that saves gate and up.
TILE_BYTES = 1 << 30


def _tile_rows(tile_tokens, tokens: int, intermediate: int, dtype: torch.dtype) -> int | None:
    """Rows per tile, or None to run untiled (``tokens`` fit in one tile)."""
    if tile_tokens is None:
        rows = max(1, TILE_BYTES // (intermediate * dtype.itemsize))
    else:
        rows = tile_tokens
    return rows if tokens > rows else None


def _check_tile_tokens(tile_tokens) -> None:
    if tile_tokens is None:
        return
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, numbers.Integral):
        raise TypeError(
            f"tile_tokens must be a positive int (tokens per tile) or None (automatic), got {tile_tokens!r}."
        )
    if tile_tokens <= 0:
        raise ValueError(
            f"tile_tokens must be a positive number of tokens per tile (or None: automatic), got {tile_tokens}."
        )


def _backward_rows(dy2, x2, gate, up, xa_g, xa_u, ha, cast, weights, scales, activation, need):
    """Gradients of the MLP over some rows: ``(dx2 or None, (dA_g, dB_g, dA_u, dB_u, dA_d, dB_d))``, each in x's
    dtype or None when not needed. ``gate`` and ``up`` (the rows' pre-activations) are overwritten with dgate and
    dup; ``ha`` None makes down's dB from h (a forward that skipped the down projection, or a tile)."""
    ga, gb, ua, ub, da_, db_ = cast
    (g_w, u_w, d_w), (g_s, u_s, d_s) = weights, scales

    # down: dA_d needs h, which the in-place pass below writes over dh, so take dxa_d for dh first
    db_now = need[6] and ha is not None
    grad_da, grad_db, dxa_d = project_backward(dy2, None, ha, da_, db_, d_s, False, db_now, True)
    dh = lora_dx([(dxa_d, da_)], [(dy2, d_w)])
    lora_mlp_act_backward(dh, gate, up, activation)
    h, dgate, dup = dh, gate, up
    if need[5]:
        grad_da = torch.mm(dxa_d.t(), h)
    if need[6] and ha is None:  # a forward that skipped the down projection: its intermediate, from h now
        grad_db = db_.new_empty(db_.shape).addmm_(dy2.t(), torch.mm(h, da_.t()), beta=0, alpha=d_s)
    del h, dh

    need_x = need[0]
    ga_grad, gb_grad, dxa_g = project_backward(dgate, x2, xa_g, ga, gb, g_s, need[1], need[2], need_x)
    ua_grad, ub_grad, dxa_u = project_backward(dup, x2, xa_u, ua, ub, u_s, need[3], need[4], need_x)
    dx = None
    if need_x:
        # both adapter terms in one thin matmul that writes dx, then the two base matmuls add onto it
        dx = lora_dx([(dxa_g, ga), (dxa_u, ua)], [(dgate, g_w), (dup, u_w)])
    return dx, (ga_grad, gb_grad, ua_grad, ub_grad, grad_da, grad_db)


# Which of the MLP's projections a checkpointed layer parks for its recompute (recompute_parking).
PARKED_PROJECTIONS = ("gate", "up")


def _project_parked(x2, weight, a, b, s, key):
    """:func:`project_forward`, parked for the recompute in a checkpointed layer's forward; in its recompute, the
    parked result instead of the base matmul (and its dequantization), with only the thin xa = x2 @ A.T computed."""
    y = take_parked(key, torch.Size((x2.shape[0], b.shape[0])), x2.dtype)
    if y is not None:
        return y, torch.mm(x2, a.t())
    y, xa = project_forward(x2, weight, a, b, s)
    if key[0] in PARKED_PROJECTIONS:
        park_for_recompute(key, y)
    return y, xa


def _tiled_forward(x2, cast, weights, scales, activation, rows):
    """y (T, hidden) computed ``rows`` tokens at a time; no (T x I) buffer is made."""
    (g_w, u_w, d_w), (g_s, u_s, d_s) = weights, scales
    y = x2.new_empty(x2.shape[0], _out_features(d_w))
    for start in range(0, x2.shape[0], rows):
        x_rows = x2[start : start + rows]
        gate, _ = project_forward(x_rows, g_w, cast[0], cast[1], g_s)
        up, _ = project_forward(x_rows, u_w, cast[2], cast[3], u_s)
        h = _act_forward(gate, up, activation)
        del gate, up
        y_rows, _ = project_forward(h, d_w, cast[4], cast[5], d_s)
        del h
        y[start : start + rows] = y_rows
    return y


def _tiled_backward(dy2, x2, cast, weights, scales, activation, rows, need):
    """``(dx2 or None, adapter gradients)`` over tiles of ``rows`` tokens, gate and up recomputed per tile.

    The adapter gradients are summed over tiles in float32 (float64 for float64 inputs): each tile's partial sum is
    rounded once to x's dtype by its matmul, and adding a dozen such bf16 partials in bf16 would round the running
    sum a dozen times more; peft's adapters are float32 anyway, where the sum is returned.
    """
    (g_w, u_w, _), (g_s, u_s, _) = weights, scales
    dx = x2.new_empty(x2.shape) if need[0] else None
    acc_dtype = torch.promote_types(x2.dtype, torch.float32)
    sums = [None] * 6
    for start in range(0, x2.shape[0], rows):
        x_rows, dy_rows = x2[start : start + rows], dy2[start : start + rows]
        gate, xa_g = project_forward(x_rows, g_w, cast[0], cast[1], g_s)
        up, xa_u = project_forward(x_rows, u_w, cast[2], cast[3], u_s)
        dx_rows, grads = _backward_rows(
            dy_rows, x_rows, gate, up, xa_g, xa_u, None, cast, weights, scales, activation, need
        )
        del gate, up, xa_g, xa_u  # this tile's (rows x I) buffers go before the next tile makes its own
        if dx is not None:
            dx[start : start + rows] = dx_rows
        del dx_rows
        for i, grad in enumerate(grads):
            if grad is not None:
                sums[i] = grad.to(acc_dtype) if sums[i] is None else sums[i].add_(grad)
    return dx, tuple(sums)


class LoRAMLPFunction(torch.autograd.Function):
    """Autograd of the LoRA gated MLP; saves x, gate, up and three (T, r) intermediates, or with ``tile_rows`` only
    x (and the adapter casts). The untiled backward runs once."""

    @staticmethod
    def forward(
        ctx,
        x,
        g_a,
        g_b,
        u_a,
        u_b,
        d_a,
        d_b,
        g_w,
        u_w,
        d_w,
        g_s,
        u_s,
        d_s,
        activation,
        output_needed,
        tile_rows=None,
        saves=True,
    ):
        x2 = x.reshape(-1, x.shape[-1])
        cast = [adapter_operand(t, x.dtype) for t in (g_a, g_b, u_a, u_b, d_a, d_b)]
        weights, scales = (g_w, u_w, d_w), (g_s, u_s, d_s)
        if not saves and tile_rows is None and output_needed and not parking_in_forward():
            # Nothing will be saved (inference, or a checkpointed layer's forward): h overwrites gate and up goes
            # before the down projection, so that two (T x I) buffers fewer are alive there (the pool of the layer
            # graphs holds exactly this peak). A parking forward takes the path below: its copies read gate and up.
            # A slot-parking forward (slot_parking) has gate and up written straight into its slots; h then goes
            # over a tensor that is not parked.
            shape = torch.Size((x2.shape[0], _out_features(g_w)))
            gate_slot = park_destination(("gate", id(g_a)), shape, x2.dtype, x2.device)
            up_slot = park_destination(("up", id(u_a)), shape, x2.dtype, x2.device)
            gate, _ = project_forward(x2, g_w, cast[0], cast[1], g_s, out=gate_slot)
            up, _ = project_forward(x2, u_w, cast[2], cast[3], u_s, out=up_slot)
            over = gate if gate_slot is None else up if up_slot is None else None
            h = _act_forward_over(over, gate, up, activation)
            del gate, up
            y, _ = project_forward(h, d_w, cast[4], cast[5], d_s)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if tile_rows is not None:
            if output_needed:
                y = _tiled_forward(x2, cast, weights, scales, activation, tile_rows)
            else:  # as below: only the graph is wanted, and a tiled forward keeps nothing else to compute
                y = x2.new_full((x2.shape[0], _out_features(d_w)), float("nan"))
            ctx.save_for_backward(x2, *cast)
        else:
            # keyed by the adapters, which the recompute gets again (their casts may be new tensors)
            gate, xa_g = _project_parked(x2, g_w, cast[0], cast[1], g_s, ("gate", id(g_a)))
            up, xa_u = _project_parked(x2, u_w, cast[2], cast[3], u_s, ("up", id(u_a)))
            if output_needed:
                h = _act_forward(gate, up, activation)
                y, ha = project_forward(h, d_w, cast[4], cast[5], d_s)
                del h  # recomputed in backward from gate and up
            else:
                # Only the graph is wanted (a checkpointed layer's recompute): y's value is never read, so the down
                # projection (and h, and its adapter intermediate, made in backward instead) are not computed. NaN,
                # so that a caller which did read it would see at once (one memset, against a skipped matmul).
                y, ha = x2.new_full((x2.shape[0], _out_features(d_w)), float("nan")), None
            ctx.save_for_backward(x2, gate, up, xa_g, xa_u, ha, *cast)
        ctx.weights, ctx.scales, ctx.activation, ctx.x_shape = weights, scales, activation, x.shape
        ctx.tile_rows, ctx.consumed = tile_rows, False
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.tile_rows is not None:
            # The tiled backward only reads what forward saved (x and the adapter casts; gate and up are recomputed
            # per tile into fresh buffers), so a second backward (retain_graph=True) is allowed and gives the same.
            x2, *cast = ctx.saved_tensors
            dx, grads = _tiled_backward(dy2, x2, cast, ctx.weights, ctx.scales, ctx.activation, ctx.tile_rows, need)
        else:
            if ctx.consumed:
                raise RuntimeError(
                    "lora_mlp's backward reuses its saved gate/up buffers in place and can run only once per forward; "
                    "run the forward again instead of backward with retain_graph=True."
                )
            ctx.consumed = True
            x2, gate, up, xa_g, xa_u, ha, *cast = ctx.saved_tensors
            dx, grads = _backward_rows(
                dy2, x2, gate, up, xa_g, xa_u, ha, cast, ctx.weights, ctx.scales, ctx.activation, need
            )
        dx = None if dx is None else dx.reshape(ctx.x_shape)
        # adapter gradients in x's dtype: the engine casts them to the adapters' (LoRALinearFunction.backward)
        return (dx, *grads, None, None, None, None, None, None, None, None, None, None)


def _out_features(weight) -> int:
    return weight_shape(weight)[0]


def lora_mlp(
    x: torch.Tensor,
    gate_w,
    gate_a: torch.Tensor,
    gate_b: torch.Tensor,
    gate_s: float,
    up_w,
    up_a: torch.Tensor,
    up_b: torch.Tensor,
    up_s: float,
    down_w,
    down_a: torch.Tensor,
    down_b: torch.Tensor,
    down_s: float,
    activation: str = "silu",
    output_needed: bool = True,
    tile_tokens: int | None = None,
) -> torch.Tensor:
    """LoRA gated MLP ``down(act(gate(x)) * up(x))`` (peft layout), gradients for x and the six adapters only.

    Each projection p of gate, up, down is ``x @ Wp.T + sp * (x @ Ap.T) @ Bp.T``.

    Args:
        x: (..., hidden), float16, bfloat16, float32 (or float64).
        gate_w: (intermediate, hidden) frozen base weight in x's dtype, or a bitsandbytes 4-bit weight (an object
            with ``.data``, the packed uint8, and ``.quant_state``); ``up_w`` likewise, ``down_w``
            (hidden, intermediate).
        gate_a: (r, hidden), peft's ``lora_A.weight``; up_a (r, hidden), down_a (r, intermediate). Cast to x's
            dtype for the matmuls; each gradient is returned in its adapter's dtype.
        gate_b: (intermediate, r), peft's ``lora_B.weight``; up_b (intermediate, r), down_b (hidden, r).
        gate_s: peft's ``scaling`` of gate_proj; up_s, down_s likewise.
        activation: ``"silu"`` (SwiGLU: Llama, Mistral, Qwen), ``"gelu"`` (exact GeGLU) or ``"gelu_tanh"`` (Gemma).
        output_needed: False when only the graph is wanted and y's value will never be read, as in the recompute
            of a checkpointed decoder layer whose MLP output only joins the residual sum
            (:func:`swiftune_kernels.recomputing_for_backward`): the down projection's base matmul (and its NF4
            dequantization) is skipped and y is NaN; the gradients are the same. Triton path only.
        tile_tokens: tokens per tile for very long sequences (module docstring): forward then keeps no
            (tokens x intermediate) buffer, and backward recomputes gate and up tile by tile. None (default) tiles
            automatically, with as many tokens a tile as fit in ``TILE_BYTES`` of one (tile x intermediate) buffer,
            only when the whole sequence does not; an int n > 0 tiles by n tokens when there are more than n.
            Triton path only (the CPU reference ignores it).

    Returns:
        y: (..., hidden) in x's dtype (all NaN when ``output_needed`` is False).
    """
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATION_IDS)}, got {activation!r}.")
    check_input(x)
    x = autocast_input(x, (gate_w, up_w, down_w))
    check_projection("gate_", x, gate_w, gate_a, gate_b, gate_s, x.shape[-1])
    intermediate = gate_b.shape[0]
    check_projection("up_", x, up_w, up_a, up_b, up_s, x.shape[-1])
    if up_b.shape[0] != intermediate:
        raise ValueError(f"gate_w and up_w must have the same out_features, got {intermediate} and {up_b.shape[0]}.")
    check_projection("down_", x, down_w, down_a, down_b, down_s, intermediate)
    _check_tile_tokens(tile_tokens)
    if use_triton(x):
        tokens = math.prod(x.shape[:-1])
        tile_rows = _tile_rows(tile_tokens, tokens, intermediate, x.dtype)
        with AutocastPaused(x):
            # whether autograd will keep this call for a backward (else the forward saves nothing)
            saves = torch.is_grad_enabled() and any(
                t.requires_grad for t in (x, gate_a, gate_b, up_a, up_b, down_a, down_b)
            )
            return LoRAMLPFunction.apply(
                x, gate_a, gate_b, up_a, up_b, down_a, down_b, gate_w, up_w, down_w,
                float(gate_s), float(up_s), float(down_s), activation, bool(output_needed), tile_rows, saves,
            )  # fmt: skip
    return _reference.lora_mlp(
        x, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w, down_a, down_b, down_s, activation
    )
