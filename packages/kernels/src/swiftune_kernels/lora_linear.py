"""Fused LoRA projection ``y = x @ W.T + s * (x @ A.T) @ B.T`` with a hand-written backward (e.g. ``o_proj``).

``W + s * B @ A`` is never formed: the adapter path costs two thin matmuls through the rank-r intermediate
``xa = x @ A.T`` (saved for backward, T x r). The base weight is frozen: no gradient is computed for it, and a
bitsandbytes 4-bit weight is dequantized on the fly (forward, and again in backward for dx) with the Triton NF4
kernel, never kept. The backward computes only what autograd asks for among dx, dA and dB:

    dxa = s * dy @ B          dB = s * dy.T @ xa          dA = dxa.T @ x          dx = dxa @ A + dy @ W

Order of the two terms of y (and of dx): the thin rank-r matmul (K = r) writes the output first, and the base
matmul then accumulates onto it with beta=1 (``y.addmm_(x, W.T)``), so that the read of the output happens in the
epilogue of the big, compute-bound GEMM, overlapped with its compute. The other order (base first, then
``y.addmm_(xa, B.T)``) makes the K = r matmul a pure memory pass that reads and rewrites all of y (T x out).
The thin matmul writes with beta=0 (the fresh output is never read) and alpha=s, so s costs no pass of its own.

The matmuls are torch's (cuBLAS on GPU); this file also holds the helpers that ``lora_qkv`` and ``lora_mlp`` share.
Applies to peft LoRA layers with dropout 0, no bias and no DoRA; the caller keeps peft's layers otherwise.
"""

from __future__ import annotations

import numbers
import weakref

import torch

from swiftune_kernels.dispatch import check_same_device, use_triton
from swiftune_kernels.nf4 import dequantize_nf4, dequantize_nf4_checked, dequantize_nf4_trusted
from swiftune_kernels.offloaded_checkpoint import in_checkpointed_forward, recomputing_for_backward
from swiftune_kernels.reference import lora as _reference

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# 4-bit weights whose packed data and quant_state passed dequantize_nf4's checks, by id: (weakref, state id, data
# pointer). A training step dequantizes each weight 2-3 times; its checks cost as much CPU time as the launch.
_CHECKED: dict[int, tuple] = {}


def materialize_weight(weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) base weight in ``dtype``: a dense weight as is, a 4-bit one dequantized by the NF4 kernel
    (its arguments checked on the weight's first use, and again whenever its data or quant_state is replaced).
    With ``out`` (contiguous, the weight's size), the weight is written there and ``out`` returned."""
    if _reference.is_quantized(weight) and dtype in _KERNEL_DTYPES and use_triton(weight.data):
        state, packed = weight.quant_state, weight.data
        seen = _CHECKED.get(id(weight))
        if seen is None or seen[0]() is not weight or seen[1] != id(state) or seen[2] != packed.data_ptr():
            dequantize_nf4_checked(packed, state, dtype)  # raises on a malformed weight; validates only
            if len(_CHECKED) >= 4096:  # a bound, for programs that make many short-lived weights
                _CHECKED.clear()
            try:
                _CHECKED[id(weight)] = (weakref.ref(weight), id(state), packed.data_ptr())
            except TypeError:  # an object without weak references (a stand-in for Params4bit): checked every time
                pass
        return dequantize_nf4_trusted(packed, state, dtype, out=out)
    dense = _reference.dense_weight(weight, dtype, dequantize=dequantize_nf4)
    return dense if out is None else out.copy_(dense)


def weight_shape(weight) -> tuple[int, ...]:
    return tuple(weight.quant_state.shape) if _reference.is_quantized(weight) else tuple(weight.shape)


def check_projection(prefix: str, x: torch.Tensor, weight, a: torch.Tensor, b: torch.Tensor, s, in_features: int):
    """Raise a ValueError/TypeError a user can act on when one LoRA projection's arguments do not fit together.

    ``prefix`` names the projection in messages: ``"gate_"`` gives ``gate_w``, ``gate_a``...; ``""`` gives ``w``.
    """
    if recomputing_for_backward():  # a checkpointed layer's recompute: its forward checked these same arguments
        return
    quantized = _reference.is_quantized(weight)
    if not quantized and not isinstance(weight, torch.Tensor):
        raise TypeError(f"{prefix}w must be a tensor or a bitsandbytes 4-bit weight, got {type(weight).__name__}.")
    shape = weight_shape(weight)
    if len(shape) != 2 or shape[1] != in_features:
        raise ValueError(f"{prefix}w must be (out_features, {in_features}), got {shape}.")
    if not quantized:
        if weight.dtype != x.dtype:
            raise TypeError(f"{prefix}w is {weight.dtype} but x is {x.dtype}; cast x (or the base weight) to match.")
        if weight.requires_grad:
            raise ValueError(
                f"{prefix}w requires grad, but the fused LoRA path trains only the adapters: freeze the base weight "
                "(requires_grad_(False)) or use peft's layer."
            )
    for label, t in ((f"{prefix}a", a), (f"{prefix}b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _X_DTYPES:
            raise TypeError(f"{label} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}.")
    if a.dim() != 2 or a.shape[1] != in_features:
        raise ValueError(f"{prefix}a must be (r, {in_features}) like peft's lora_A.weight, got {tuple(a.shape)}.")
    if b.dim() != 2 or b.shape != (shape[0], a.shape[0]):
        raise ValueError(
            f"{prefix}b must be ({shape[0]}, {a.shape[0]}) like peft's lora_B.weight, got {tuple(b.shape)}."
        )
    if not isinstance(s, numbers.Real):
        raise TypeError(f"{prefix}s must be a number (peft's scaling), got {type(s).__name__}.")
    packed = weight.data if quantized else weight
    check_same_device(x=x, **{f"{prefix}w": packed, f"{prefix}a": a, f"{prefix}b": b})


def autocast_input(x: torch.Tensor, weights) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on and it is wider, as ``nn.Linear`` would take it.

    The fused projections are autograd Functions, which autocast does not cast: without this, a float32 residual
    stream (float32 embeddings and norms, as peft's ``prepare_model_for_kbit_training`` leaves them) would run every
    matmul, and dequantize every 4-bit weight, in float32, and save float32 inputs. Only where every base weight
    is 4-bit or already in the autocast dtype (a dense float32 weight keeps the float32 input its check asks for).
    The cast is differentiable: the input's gradient comes back in its own dtype.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x
    target = torch.get_autocast_dtype(device_type)
    if x.dtype != torch.float32 or target not in (torch.bfloat16, torch.float16):
        return x
    if all(_reference.is_quantized(w) or getattr(w, "dtype", None) == target for w in weights):
        return x.to(target)
    return x


class AutocastPaused:
    """``with AutocastPaused(x):`` runs its body with autocast off on ``x``'s device type, and puts it back after.

    The fused LoRA functions run every matmul in ``x``'s dtype with operands they cast themselves
    (:func:`autocast_input`, :func:`adapter_operand`), so autocast has nothing to do inside them, yet each matmul
    issued under it passes through autocast's dispatch: ~6 us of host time a call on an H100 host (bench/perf/
    launch_costs.py), ~1,300 calls a step at Llama-8B QLoRA, where the host bounds the step. Autocast's cast cache
    and nesting are left alone; this only switches the flag, a slot lookup each way.
    """

    __slots__ = ("device_type", "was_on")

    def __init__(self, x: torch.Tensor) -> None:
        self.device_type = x.device.type
        self.was_on = False

    def __enter__(self) -> None:
        if torch.is_autocast_enabled(self.device_type):
            self.was_on = True
            torch.set_autocast_enabled(self.device_type, False)

    def __exit__(self, *exc_info) -> None:
        if self.was_on:
            torch.set_autocast_enabled(self.device_type, True)


def check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be a float16, bfloat16, float32 or float64 tensor, got {getattr(x, 'dtype', x)}.")
    if x.dim() < 1:
        raise ValueError("x must have a feature dimension: (..., in_features).")


def project_forward(x2, weight, a, b, s, out=None):
    """``(x2 @ W.T + s * xa @ B.T, xa)`` for x2 (T, in) with a, b already in x2's dtype; xa = x2 @ A.T, unscaled.
    ``out``: a contiguous (T, out_features) tensor of x2's dtype to write y into, else a new one.

    The rank-r term is written first (a write-only thin matmul), then the base matmul adds onto it with beta=1:
    see the module docstring for why the order matters.
    """
    xa = torch.mm(x2, a.t())
    # beta=0: the fresh y is not read (nor its garbage propagated); alpha=s scales in the same matmul
    y = (x2.new_empty(x2.shape[0], b.shape[0]) if out is None else out).addmm_(xa, b.t(), beta=0, alpha=s)
    w = materialize_weight(weight, x2.dtype)
    y.addmm_(x2, w.t())
    del w  # a dequantized weight is freed before the next one is made
    return y, xa


def project_backward(dy2, x2, xa, a, b, s, need_a, need_b, need_dxa):
    """``(dA, dB, dxa)`` of one projection, each None when not needed; dy2 (T, out), x2 (T, in), xa (T, r)."""
    # beta=0 into fresh tensors, alpha=s: the scale costs no launch of its own
    dxa = dy2.new_empty(dy2.shape[0], b.shape[1]).addmm_(dy2, b, beta=0, alpha=s) if (need_a or need_dxa) else None
    db = xa.new_empty(dy2.shape[1], xa.shape[1]).addmm_(dy2.t(), xa, beta=0, alpha=s) if need_b else None
    da = torch.mm(dxa.t(), x2) if need_a else None
    return da, db, dxa


def lora_dx(rank_terms, base_terms) -> torch.Tensor:
    """``dx = sum_i dxa_i @ A_i + sum_j dy_j @ W_j``: all rank-r terms first, as one thin matmul, then the base terms.

    Why this order: a matmul with K = r (16, say) is memory-bound, and as ``dx.addmm_(dxa, A)`` after the base
    matmuls it would read and rewrite all of dx (T x in) for almost no arithmetic. Written first, with the rank-r
    terms of every projection concatenated along r, it is one write-only pass; each base matmul then accumulates
    onto dx with beta=1 (``dx.addmm_(dy, W)``), whose read of dx happens in the epilogue of that compute-bound GEMM.

    Args:
        rank_terms: non-empty iterable of ``(dxa, A)`` pairs, dxa (T, r_i) already scaled by s_i, A (r_i, in).
        base_terms: iterable of ``(dy, W)`` pairs, dy (T, out_j), W (out_j, in) dense or bitsandbytes 4-bit. Each
            W is materialized (dequantized) right before its matmul and freed after it, so that one dequantized
            weight is alive at a time; pass a generator or ``zip`` to keep it that way.

    Returns:
        dx: (T, in), contiguous, in dxa's dtype.
    """
    dxas, adapters = zip(*rank_terms, strict=True)
    if len(dxas) == 1:
        dx = torch.mm(dxas[0], adapters[0])
    else:
        dx = torch.mm(torch.cat(dxas, dim=1), torch.cat(adapters, dim=0))
    for dy, weight in base_terms:
        w = materialize_weight(weight, dy.dtype)
        dx.addmm_(dy, w)
        del w
    return dx


# Adapter casts made by a checkpointed layer's forward, by tensor id: (weakref, version, the cast). Its recompute for
# backward takes the cast from here instead of casting again (same tensor, same version: the same values), and drops
# it; an entry also goes when its adapter is freed.
_CASTS: dict[int, tuple] = {}


def adapter_operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The adapter weight ``t`` in the compute ``dtype``. In a checkpointed layer, the forward's cast is kept until
    the layer's recompute for backward (:func:`swiftune_kernels.recomputing_for_backward`) takes it, if ``t`` has not
    changed in between (its version counter), so that a checkpointed step casts each adapter once, not twice."""
    if t.dtype == dtype:
        return t
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        # Under CUDA graph capture (layer_graphs) nothing is kept or taken: a kept cast would be a tensor of the
        # graph's pool (never computed by the capture itself, and reused by the next one), and a taken one would
        # be read by every replay at an address that no longer holds it.
        return t.to(dtype)
    if recomputing_for_backward():
        hit = _CASTS.pop(id(t), None)
        if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2].dtype == dtype:
            return hit[2]
        return t.to(dtype)
    cast = t.to(dtype)
    if in_checkpointed_forward():
        key = id(t)
        try:
            _CASTS[key] = (weakref.ref(t, lambda _, key=key: _CASTS.pop(key, None)), t._version, cast)
        except TypeError:
            pass
    return cast


class LoRALinearFunction(torch.autograd.Function):
    """Autograd of one LoRA projection; saves x and the (T, r) intermediate, never the (dequantized) base weight."""

    @staticmethod
    def forward(ctx, x, a, b, weight, s):
        x2 = x.reshape(-1, x.shape[-1])
        a_, b_ = adapter_operand(a, x.dtype), adapter_operand(b, x.dtype)
        y, xa = project_forward(x2, weight, a_, b_, s)
        ctx.save_for_backward(x2, xa, a_, b_)
        ctx.weight, ctx.s, ctx.x_shape = weight, s, x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, a_, b_ = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        dy2 = dy.reshape(-1, dy.shape[-1])
        da, db, dxa = project_backward(dy2, x2, xa, a_, b_, ctx.s, need_a, need_b, need_x)
        dx = lora_dx([(dxa, a_)], [(dy2, ctx.weight)]).reshape(ctx.x_shape) if need_x else None
        # da and db stay in x's dtype: the autograd engine casts a gradient to its input's dtype (peft's float32
        # adapters) in C++, where a .to() here cost ~14 us of host time per adapter, ~450 a step at Llama-8B
        return dx, da, db, None, None


def lora_linear(x: torch.Tensor, w, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """One LoRA projection ``x @ W.T + s * (x @ A.T) @ B.T`` (peft layout), gradients for x, A and B only.

    Args:
        x: (..., in_features), float16, bfloat16, float32 (or float64).
        w: (out_features, in_features) frozen base weight in x's dtype, or a bitsandbytes 4-bit weight (an object
            with ``.data``, the packed uint8, and ``.quant_state``, e.g. ``Linear4bit.weight``).
        a: (r, in_features), peft's ``lora_A.weight``; cast to x's dtype for the matmuls, gradient in its own dtype.
        b: (out_features, r), peft's ``lora_B.weight``.
        s: peft's ``scaling`` (``lora_alpha / r``).

    Returns:
        y: (..., out_features) in x's dtype.
    """
    check_input(x)
    x = autocast_input(x, (w,))
    check_projection("", x, w, a, b, s, x.shape[-1])
    if use_triton(x):
        with AutocastPaused(x):
            return LoRALinearFunction.apply(x, a, b, w, float(s))
    return _reference.lora_linear(x, w, a, b, s)
