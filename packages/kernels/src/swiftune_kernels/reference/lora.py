"""Pure-torch LoRA projections (the oracle and CPU fallback of ``swiftune_kernels.lora_*``), by torch autograd.

A LoRA projection with peft's layout, base weight ``W`` (out, in) frozen, adapters ``A`` (r, in) and ``B`` (out, r),
scale ``s`` (peft's ``scaling``, ``lora_alpha / r``):

    y = x @ W.T + s * (x @ A.T) @ B.T

``W`` is a float tensor, or a bitsandbytes 4-bit weight (an object with ``.data``, the packed uint8 indices, and
``.quant_state``) dequantized to the computation dtype. The adapters are cast to the dtype of ``x`` (peft keeps
them in float32 and casts ``x`` up instead; with the adapters in the same dtype as ``x`` the two agree). Everything
runs in the dtype of ``x``; tests call these in float64. Applies to peft's ``LoraLayer`` with dropout 0, no bias
and no DoRA.

- ``lora_linear``: one projection (e.g. ``o_proj``).
- ``lora_qkv``: ``q``, ``k`` and ``v`` projections of one input.
- ``lora_mlp``: a gated MLP ``down(act(gate(x)) * up(x))`` with each of gate, up and down a LoRA projection.
"""

from __future__ import annotations

import math

import torch

from swiftune_kernels.reference.gated_activation import gated_activation
from swiftune_kernels.reference.nf4 import dequantize_nf4

_DEQUANT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def is_quantized(weight) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit weight (it carries a ``quant_state``)."""
    return getattr(weight, "quant_state", None) is not None


def dense_weight(weight, dtype: torch.dtype, dequantize=dequantize_nf4) -> torch.Tensor:
    """The (out, in) base weight in ``dtype``: dequantized when 4-bit (float64 through an exact float32 step)."""
    if is_quantized(weight):
        out_dtype = dtype if dtype in _DEQUANT_DTYPES else torch.float32
        return dequantize(weight.data, weight.quant_state, out_dtype).to(dtype)
    return weight.to(dtype)


def lora_linear(x: torch.Tensor, w, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``x @ W.T + s * (x @ A.T) @ B.T``: x (..., in) -> (..., out)."""
    weight = dense_weight(w, x.dtype)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, a.to(x.dtype)), b.to(x.dtype))
    return torch.nn.functional.linear(x, weight) + s * lora


def lora_qkv(x, q_w, q_a, q_b, q_s, k_w, k_a, k_b, k_s, v_w, v_a, v_b, v_s):
    """The three LoRA projections of one input: returns (q, k, v)."""
    return lora_linear(x, q_w, q_a, q_b, q_s), lora_linear(x, k_w, k_a, k_b, k_s), lora_linear(x, v_w, v_a, v_b, v_s)


def lora_mlp(x, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w, down_a, down_b, down_s, activation):
    """``down(act(gate(x)) * up(x))`` with LoRA on all three projections; the activation as in gated_activation."""
    gate = lora_linear(x, gate_w, gate_a, gate_b, gate_s)
    up = lora_linear(x, up_w, up_a, up_b, up_s)
    return lora_linear(gated_activation(gate, up, activation), down_w, down_a, down_b, down_s)


def activation_and_grad(g: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(g), act'(g))`` written out, for hand-written backward passes that do not run in Triton (float64)."""
    if name == "silu":
        sig = torch.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
        return g * cdf, cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        sig = torch.sigmoid(2.0 * k * (g + 0.044715 * g * g * g))  # 0.5 * (1 + tanh(u)) == sigmoid(2u)
        return g * sig, sig + 2.0 * g * sig * (1.0 - sig) * k * (1.0 + 3 * 0.044715 * g * g)
    raise ValueError(f"unknown activation {name!r}")
