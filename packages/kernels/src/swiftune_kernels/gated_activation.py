"""Gated activations of transformer MLPs, ``h = act(gate) * up``: SwiGLU (silu) and GeGLU (exact erf or tanh GELU).

Elementwise and memory-bound: the forward reads gate and up and writes h; the backward reads dh, gate and up and
writes dgate and dup, recomputing the activation instead of saving it (only gate and up are kept for backward,
one tensor fewer than eager's silu + mul). Contiguous inputs are walked as one flat range; row-strided views (e.g.
gate and up chunked from a fused gate_up projection) as (rows, cols) with a row stride each, with no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swiftune_kernels.dispatch import check_floating, check_same_device, use_triton
from swiftune_kernels.reference import gated_activation as _reference

_ACTIVATION_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _activation_and_grad(g, ACTIVATION: tl.constexpr):
    """Return (act(g), act'(g)) in float32; a caller that ignores act' gets it removed as dead code."""
    if ACTIVATION == 0:  # silu
        s = tl.sigmoid(g)
        act = g * s
        d_act = s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == 1:  # exact gelu
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        act = g * cdf
        d_act = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1/sqrt(2 pi)
    else:  # tanh gelu; 0.5 * (1 + tanh(u)) == sigmoid(2u), which also avoids the 1 - tanh^2 cancellation
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) (g + 0.044715 g^3)
        s = tl.sigmoid(2.0 * u)
        act = g * s
        # d/dg [g s] = s + g * 2 s (1 - s) * du/dg
        d_act = s + 2.0 * g * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    return act, d_act


@triton.jit
def _gated_activation_fwd_kernel(
    gate_ptr,
    up_ptr,
    h_ptr,
    stride_gm,
    stride_um,
    stride_hm,
    n_cols,
    n_col_blocks,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_um + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation_and_grad(g, ACTIVATION)
    tl.store(h_ptr + row * stride_hm + cols, act * u, mask=mask)


@triton.jit
def _gated_activation_bwd_kernel(
    dh_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    stride_dhm,
    stride_gm,
    stride_um,
    stride_dgm,
    stride_dum,
    n_cols,
    n_col_blocks,
    ACTIVATION: tl.constexpr,
    NEED_DGATE: tl.constexpr,
    NEED_DUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dh = tl.load(dh_ptr + row * stride_dhm + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _activation_and_grad(g, ACTIVATION)
    if NEED_DUP:
        tl.store(dup_ptr + row * stride_dum + cols, dh * act, mask=mask)
    if NEED_DGATE:  # up is read only when gate needs its gradient
        u = tl.load(up_ptr + row * stride_um + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dgate_ptr + row * stride_dgm + cols, dh * u * d_act, mask=mask)


_BLOCK_SIZE = 1024  # 8 elements a thread at 4 warps: one 16-byte access per tensor in bf16, as inductor's pointwise
_NUM_WARPS = 4


def _as_rows(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int], int, int]:
    """View same-shaped tensors as (rows, cols) with a row stride each and unit column stride.

    All contiguous: one flat row of numel elements (no tail waste per row). Otherwise each tensor is viewed as
    (-1, last_dim), copied only when that view does not exist.
    """
    if all(t.is_contiguous() for t in tensors):
        return [t.reshape(1, -1) for t in tensors], [0] * len(tensors), 1, tensors[0].numel()
    n_cols = tensors[0].shape[-1]
    views = []
    for t in tensors:
        try:
            v = t.view(-1, n_cols)
        except RuntimeError:
            v = t.reshape(-1, n_cols).contiguous()
        if v.stride(1) != 1:
            v = v.contiguous()
        views.append(v)
    return views, [v.stride(0) for v in views], views[0].shape[0], n_cols


def _grid(n_rows: int, n_cols: int) -> tuple[int, int, tuple[int]]:
    block = min(_BLOCK_SIZE, triton.next_power_of_2(max(n_cols, 1)))
    n_col_blocks = triton.cdiv(n_cols, block)
    return block, n_col_blocks, (n_rows * n_col_blocks,)


def gated_activation_forward(
    gate: torch.Tensor, up: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch ``h = act(gate) * up``; h is contiguous with gate's shape and dtype.

    ``out`` (contiguous, gate's shape and dtype) receives h and may be ``gate`` itself: each element is read before
    it is written, by the same thread."""
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    assert out is None or (out.is_contiguous() and out.shape == gate.shape and out.dtype == gate.dtype)
    if h.numel() == 0:
        return h
    (g2, u2, h2), (s_g, s_u, s_h), n_rows, n_cols = _as_rows([gate, up, h])
    block, n_col_blocks, grid = _grid(n_rows, n_cols)
    _gated_activation_fwd_kernel[grid](
        g2, u2, h2, s_g, s_u, s_h, n_cols, n_col_blocks,
        ACTIVATION=_ACTIVATION_IDS[activation], BLOCK_SIZE=block, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return h


def gated_activation_backward(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str, need_dgate: bool, need_dup: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the gradients ``dgate = dh * up * act'(gate)`` and ``dup = dh * act(gate)`` that are asked for."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if need_dgate else None
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device) if need_dup else None
    if not (need_dgate or need_dup) or gate.numel() == 0:
        return dgate, dup
    # a tensor that is not written still needs a pointer and a stride: reuse gate's, never touched
    outs = [dgate if need_dgate else gate, dup if need_dup else gate]
    (dh2, g2, u2, dg2, du2), strides, n_rows, n_cols = _as_rows([dh, gate, up, *outs])
    block, n_col_blocks, grid = _grid(n_rows, n_cols)
    _gated_activation_bwd_kernel[grid](
        dh2, g2, u2, dg2, du2, *strides, n_cols, n_col_blocks,
        ACTIVATION=_ACTIVATION_IDS[activation], NEED_DGATE=need_dgate, NEED_DUP=need_dup,
        BLOCK_SIZE=block, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return dgate, dup


class GatedActivationFunction(torch.autograd.Function):
    """Autograd of ``act(gate) * up`` on the Triton path; saves gate and up, recomputes act in backward."""

    @staticmethod
    def forward(ctx, gate, up, activation):
        h = gated_activation_forward(gate, up, activation)
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dgate, dup = gated_activation_backward(
            dh, gate, up, ctx.activation, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return dgate, dup, None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Gated activation ``act(gate) * up``, computed in float32 and stored in the input dtype.

    Args:
        gate: (..., intermediate) output of the gate projection.
        up: (..., intermediate) output of the up projection, same shape and dtype as ``gate``.
        activation: ``"silu"`` (SwiGLU), ``"gelu"`` (exact erf GELU) or ``"gelu_tanh"`` (tanh approximation,
            transformers' ``gelu_pytorch_tanh``).

    Returns:
        h: (..., intermediate), contiguous, in the dtype of ``gate``.
    """
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATION_IDS)}, got {activation!r}.")
    check_floating("gate", gate)
    check_floating("up", up)
    check_same_device(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape.")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype; cast one with .to().")
    if use_triton(gate):
        return GatedActivationFunction.apply(gate, up, activation)
    return _reference.gated_activation(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``silu(gate) * up`` (Llama, Mistral, Qwen MLPs).

    Args:
        gate: (..., intermediate).
        up: (..., intermediate), same shape and dtype as ``gate``.

    Returns:
        h: (..., intermediate) in the dtype of ``gate``.
    """
    return gated_activation(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GeGLU ``gelu(gate) * up`` (Gemma MLPs).

    Args:
        gate: (..., intermediate).
        up: (..., intermediate), same shape and dtype as ``gate``.
        approximate: ``"none"`` for the exact erf GELU, ``"tanh"`` for the tanh approximation, as in
            ``torch.nn.functional.gelu``.

    Returns:
        h: (..., intermediate) in the dtype of ``gate``.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}.")
    return gated_activation(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
