"""Fused LoRA MLP / QKV / linear: outputs and the gradients of x, A and B against peft's LoRA layers (float64) and
against the float64 reference, for dense and NF4 base weights; the Triton parts (activation, NF4 dequantization)
run under the interpreter on CPU."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from swiftune_kernels.lora_linear import LoRALinearFunction, lora_linear
from swiftune_kernels.lora_mlp import LoRAMLPFunction, lora_mlp
from swiftune_kernels.lora_qkv import LoRAQKVFunction, lora_qkv
from swiftune_kernels.reference import lora as reference
from swiftune_kernels.reference import nf4 as reference_nf4

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

HIDDEN, INTERMEDIATE, KV, RANK, ALPHA = 37, 53, 19, 4, 8  # peft scaling = ALPHA / RANK = 2
TOKENS = (2, 7)
ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]
# projection name -> (out_features, in_features)
MLP = {"gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}
QKV = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN)}
LINEAR = {"o_proj": (HIDDEN, HIDDEN)}
# float64 against float64: only the order of summation differs
EXACT = {"atol": 1e-10, "rtol": 1e-10}


def _torch_act(name):
    return {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}[name]


class TinyMLP(nn.Module):
    def __init__(self, activation):
        super().__init__()
        for name, (out_f, in_f) in MLP.items():
            setattr(self, name, nn.Linear(in_f, out_f, bias=False))
        self.act = _torch_act(activation)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TinyAttentionProjections(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (out_f, in_f) in {**QKV, **LINEAR}.items():
            setattr(self, name, nn.Linear(in_f, out_f, bias=False))

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _quantize(weight, quantizer):  # weight on the test device
    """A 4-bit weight: a real bitsandbytes Params4bit, or (no bitsandbytes) packed data + a QuantState twin."""
    if quantizer == "bitsandbytes":
        bnb = pytest.importorskip("bitsandbytes")
        param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        return param._quantize(weight.device)
    packed, state = reference_nf4.quantize_nf4(weight, 64, compress_statistics=True, nested_blocksize=8)
    return types.SimpleNamespace(data=packed, quant_state=state)


def _make_weights(shapes, dtype, base, device, seed=0):
    """{name: (base weight for our op, the same weight dense in dtype, A, B)} on ``device``, all random (B too)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (out_f, in_f) in shapes.items():
        w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(device, torch.bfloat16)  # a bf16 checkpoint
        a = (torch.randn(RANK, in_f, generator=gen) / in_f**0.5).to(device, dtype)
        b = (torch.randn(out_f, RANK, generator=gen) / RANK**0.5).to(device, dtype)
        if base == "dense":
            ours = w.to(dtype)
            dense = ours
        else:
            ours = _quantize(w, base)
            dense = reference.dense_weight(ours, dtype)  # what the op computes with
        weights[name] = (ours, dense, a, b)
    return weights


def _build_peft(module, weights, device):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(weights), lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(module.to(device, torch.float64), config)
    layers = {}
    for name, (_, dense, a, b) in weights.items():
        layer = getattr(model.base_model.model, name)
        with torch.no_grad():
            layer.base_layer.weight.copy_(dense.double())
            layer.lora_A["default"].weight.copy_(a.double())
            layer.lora_B["default"].weight.copy_(b.double())
        layers[name] = layer
    return model, layers


def _inputs(dtype, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*TOKENS, HIDDEN, generator=gen).to(device, dtype)


def _ours(op, x, weights, scale, activation=None):
    """Run our op with fresh leaves; return (outputs, leaves) with leaves = [x, A1, B1, A2, B2, ...]."""
    x = x.detach().clone().requires_grad_(True)
    leaves, args = [x], [x]
    for ours, _, a, b in weights.values():
        a, b = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
        leaves += [a, b]
        args += [ours, a, b, scale]
    out = op(*args, activation) if activation else op(*args)
    return (out if isinstance(out, tuple) else (out,)), leaves


def _backward(outs, seed=2):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(list(outs), grads)
    return grads


def _peft_case(kind, activation, base, device):
    if kind == "mlp":
        weights = _make_weights(MLP, torch.float64, base, device)
        model, layers = _build_peft(TinyMLP(activation), weights, device)
        return weights, model, layers, lora_mlp, activation
    shapes = QKV if kind == "qkv" else LINEAR
    weights = _make_weights(shapes, torch.float64, base, device)
    model, layers = _build_peft(TinyAttentionProjections(), weights, device)
    op = lora_qkv if kind == "qkv" else lora_linear
    return weights, model, layers, op, None


@pytest.mark.parametrize("base", ["dense", "nf4-reference", "bitsandbytes"])
@pytest.mark.parametrize(
    "kind,activation", [("mlp", "silu"), ("mlp", "gelu"), ("mlp", "gelu_tanh"), ("qkv", None), ("linear", None)]
)
def test_matches_peft_in_float64(device, kind, activation, base):
    """Our Function (device: the interpreter on CPU) against peft's LoRA layers on the same (dequantized) weights."""
    base = "reference" if base == "nf4-reference" else base
    weights, model, layers, op, act = _peft_case(kind, activation, base, device)
    scale = next(iter(layers.values())).scaling["default"]
    assert scale == ALPHA / RANK
    x = _inputs(torch.float64, device)
    outs, leaves = _ours(op, x, weights, scale, act)
    grads = _backward(outs)

    x_peft = x.clone().requires_grad_(True)
    if kind == "linear":
        expected = (layers["o_proj"](x_peft),)
    else:
        expected = model(x_peft)
        expected = expected if isinstance(expected, tuple) else (expected,)
    torch.autograd.backward(list(expected), grads)
    for out, exp in zip(outs, expected, strict=True):
        torch.testing.assert_close(out.detach(), exp.detach(), **EXACT)
    torch.testing.assert_close(leaves[0].grad, x_peft.grad, **EXACT)
    for i, layer in enumerate(layers.values()):
        torch.testing.assert_close(leaves[1 + 2 * i].grad, layer.lora_A["default"].weight.grad, **EXACT)
        torch.testing.assert_close(leaves[2 + 2 * i].grad, layer.lora_B["default"].weight.grad, **EXACT)
        assert layer.base_layer.weight.grad is None


OPS = {"mlp": (MLP, lora_mlp, reference.lora_mlp), "qkv": (QKV, lora_qkv, reference.lora_qkv)}
OPS["linear"] = (LINEAR, lora_linear, reference.lora_linear)


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kind,activation", [("mlp", "silu"), ("mlp", "gelu"), ("mlp", "gelu_tanh"), ("qkv", None), ("linear", None)]
)
def test_triton_path_matches_float64_reference(device, tolerance, kind, activation, dtype, base):
    shapes, op, ref_op = OPS[kind]
    weights = _make_weights(shapes, dtype, "dense" if base == "dense" else "reference", device)
    # the oracle: the same inputs upcast to float64, the base weight as our op sees it (dequantized in dtype)
    weights64 = {n: (dense.double(), dense.double(), a.double(), b.double()) for n, (_, dense, a, b) in weights.items()}
    x = _inputs(dtype, device)
    outs, leaves = _ours(op, x, weights, 2.0, activation)
    grads = _backward(outs)
    outs64, leaves64 = _ours(ref_op, x.double(), weights64, 2.0, activation)
    torch.autograd.backward(list(outs64), [g.double() for g in grads])

    tol = tolerance(dtype)
    pairs = [(o.detach(), e.detach()) for o, e in zip(outs, outs64, strict=True)]
    pairs += [(leaf.grad, leaf64.grad) for leaf, leaf64 in zip(leaves, leaves64, strict=True)]
    for got, exp in pairs:
        assert got.dtype == dtype and got.shape == exp.shape
        # Errors here come from roundings of whole (T, features) intermediates (gate, up, h, dh, dgate, dup: each
        # 2^-9 relative in bf16) that matmuls then sum over a feature axis: an element's error scales with the
        # size of the terms summed, i.e. with the tensor's scale, not with its own value (which can cancel to ~0).
        # So the table's atol is applied relative to the tensor's largest value; measured: <= 1.1e-2 in bf16.
        scale = exp.abs().max().item()
        torch.testing.assert_close(got.double(), exp, atol=tol["atol"] * scale, rtol=tol["rtol"])


def test_float32_adapters_on_a_bf16_base(device, tolerance):
    """peft keeps adapters in float32 over a bf16 model: the gradients come back in float32."""
    weights = _make_weights(MLP, torch.bfloat16, "dense", device)
    weights = {n: (w, d, a.float(), b.float()) for n, (w, d, a, b) in weights.items()}
    weights64 = {n: (d.double(), d.double(), a.double(), b.double()) for n, (_, d, a, b) in weights.items()}
    x = _inputs(torch.bfloat16, device)
    outs, leaves = _ours(lora_mlp, x, weights, 2.0, "silu")
    grads = _backward(outs)
    outs64, leaves64 = _ours(reference.lora_mlp, x.double(), weights64, 2.0, "silu")
    torch.autograd.backward(list(outs64), [g.double() for g in grads])
    assert outs[0].dtype == torch.bfloat16 and leaves[0].grad.dtype == torch.bfloat16
    tol = tolerance(torch.bfloat16)
    for leaf, leaf64 in zip(leaves[1:], leaves64[1:], strict=True):
        assert leaf.grad.dtype == torch.float32
        scale = leaf64.grad.abs().max().item()  # see test_triton_path_matches_float64_reference
        torch.testing.assert_close(leaf.grad.double(), leaf64.grad, atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.mark.parametrize("kind", ["mlp", "qkv", "linear"])
def test_frozen_inputs_get_no_gradient(device, tolerance, kind):
    """x without grad (first layer) and frozen adapters: no gradient computed for them, the others unchanged."""
    shapes, op, ref_op = OPS[kind]
    weights = _make_weights(shapes, torch.float32, "dense", device)
    act = "silu" if kind == "mlp" else None
    x = _inputs(torch.float32, device)
    args, trained = [x], []
    for i, (w, _, a, b) in enumerate(weights.values()):
        a, b = a.clone().requires_grad_(i != 0), b.clone().requires_grad_(True)
        args += [w, a, b, 2.0]
        trained += [a, b]
    outs = op(*args, act) if act else op(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = _backward(outs)
    assert x.grad is None and trained[0].grad is None
    args64 = [t.detach().double().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args]
    outs64 = ref_op(*args64, act) if act else ref_op(*args64)
    outs64 = outs64 if isinstance(outs64, tuple) else (outs64,)
    torch.autograd.backward(list(outs64), [g.double() for g in grads])
    for t, t64 in zip(args, args64, strict=True):
        if isinstance(t, torch.Tensor) and t.grad is not None:
            torch.testing.assert_close(t.grad.double(), t64.grad, **tolerance(torch.float32))


def test_mlp_backward_runs_once_because_buffers_are_reused(device):
    """The saved gate/up buffers receive dgate/dup in place: a second backward must fail loudly, not silently."""
    weights = _make_weights(MLP, torch.float32, "dense", device)
    outs, _ = _ours(lora_mlp, _inputs(torch.float32, device), weights, 2.0, "silu")
    outs[0].sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        outs[0].sum().backward()


@pytest.mark.parametrize("kind", ["mlp", "qkv", "linear"])
def test_reference_path_without_interpreter(reference_only, monkeypatch, kind):
    shapes, op, ref_op = OPS[kind]
    function = {"mlp": LoRAMLPFunction, "qkv": LoRAQKVFunction, "linear": LoRALinearFunction}[kind]

    def fail(*args, **kwargs):
        raise AssertionError("the fused Function ran on a CPU tensor without TRITON_INTERPRET=1")

    monkeypatch.setattr(function, "apply", fail)
    weights = _make_weights(shapes, torch.float32, "reference", "cpu")
    act = "silu" if kind == "mlp" else None
    outs, _ = _ours(op, _inputs(torch.float32), weights, 2.0, act)
    expected, _ = _ours(ref_op, _inputs(torch.float32), weights, 2.0, act)
    for o, e in zip(outs, expected, strict=True):
        assert torch.equal(o, e)


def test_bad_inputs_raise_clear_errors():
    weights = _make_weights(LINEAR, torch.float32, "dense", "cpu")
    w, _, a, b = weights["o_proj"]
    x = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"a must be \(r, 37\)"):
        lora_linear(x, w, a[:, :-1], b, 2.0)
    with pytest.raises(ValueError, match=r"b must be"):
        lora_linear(x, w, a, b.t(), 2.0)
    with pytest.raises(TypeError, match="cast x"):
        lora_linear(x.bfloat16(), w, a, b, 2.0)
    with pytest.raises(ValueError, match="freeze the base weight"):
        lora_linear(x, w.clone().requires_grad_(True), a, b, 2.0)
    with pytest.raises(ValueError, match="one device"):
        lora_linear(x, w, a.to("meta"), b, 2.0)
    with pytest.raises(TypeError, match="x must be"):
        lora_linear(x.long(), w, a, b, 2.0)
    mlp = _make_weights(MLP, torch.float32, "dense", "cpu")
    args = [x] + [t for w_, _, a_, b_ in mlp.values() for t in (w_, a_, b_, 2.0)]
    with pytest.raises(ValueError, match="activation must be"):
        lora_mlp(*args, "relu")
    args_bad = list(args)
    args_bad[9] = args_bad[9][:, :-1]  # down_w (hidden, intermediate - 1)
    with pytest.raises(ValueError, match="down_w"):
        lora_mlp(*args_bad, "silu")


def test_mlp_under_activation_checkpointing(device):
    """Non-reentrant checkpointing recomputes the saved gate/up that backward then overwrites: still exact."""
    weights = _make_weights(MLP, torch.float32, "reference", device)
    x = _inputs(torch.float32, device)
    outs, leaves = _ours(lora_mlp, x, weights, 2.0, "silu")
    grads = _backward(outs)

    def checkpointed(x_, *args):
        return torch.utils.checkpoint.checkpoint(lora_mlp, x_, *args, use_reentrant=False)

    outs_ckpt, leaves_ckpt = _ours(checkpointed, x, weights, 2.0, "silu")
    torch.autograd.backward(list(outs_ckpt), grads)
    # the same ops on the same inputs: bitwise equal on the CPU (cuBLAS may pick another reduction order on a GPU)
    same = torch.equal if device.type == "cpu" else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert same(outs[0], outs_ckpt[0])
    for leaf, leaf_ckpt in zip(leaves, leaves_ckpt, strict=True):
        assert same(leaf.grad, leaf_ckpt.grad)


def test_non_contiguous_input(device, tolerance):
    """x as a transposed view (e.g. after a permute), 3-D: reshaped inside, gradient in x's shape."""
    weights = _make_weights(QKV, torch.float32, "dense", device)
    x = _inputs(torch.float32, device).transpose(0, 1)  # (7, 2, hidden), not contiguous
    assert not x.is_contiguous()
    outs, leaves = _ours(lora_qkv, x, weights, 2.0)
    grads = _backward(outs)
    weights64 = {n: (d.double(), d.double(), a.double(), b.double()) for n, (_, d, a, b) in weights.items()}
    outs64, leaves64 = _ours(reference.lora_qkv, x.double(), weights64, 2.0)
    torch.autograd.backward(list(outs64), [g.double() for g in grads])
    assert leaves[0].grad.shape == x.shape
    for leaf, leaf64 in zip(leaves, leaves64, strict=True):
        torch.testing.assert_close(leaf.grad.double(), leaf64.grad, **tolerance(torch.float32))


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_float16(device, tolerance, base):
    """float16 activations (dense fp16 base, or NF4 dequantized to fp16): the bf16 bound of the table is used, which
    is conservative for float16 (10 explicit mantissa bits against bfloat16's 7; values here stay far from fp16's
    range limits)."""
    weights = _make_weights(MLP, torch.float16, "dense" if base == "dense" else "reference", device)
    weights64 = {n: (d.double(), d.double(), a.double(), b.double()) for n, (_, d, a, b) in weights.items()}
    x = _inputs(torch.float16, device)
    outs, leaves = _ours(lora_mlp, x, weights, 2.0, "gelu_tanh")
    grads = _backward(outs)
    outs64, leaves64 = _ours(reference.lora_mlp, x.double(), weights64, 2.0, "gelu_tanh")
    torch.autograd.backward(list(outs64), [g.double() for g in grads])
    tol = tolerance(torch.bfloat16)
    pairs = [(outs[0].detach(), outs64[0].detach())] + [
        (t.grad, t64.grad) for t, t64 in zip(leaves, leaves64, strict=True)
    ]
    for got, exp in pairs:
        assert got.dtype == torch.float16
        scale = exp.abs().max().item()  # see test_triton_path_matches_float64_reference
        torch.testing.assert_close(got.double(), exp, atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_mlp_without_output_gives_the_same_gradients_and_skips_the_down_projection(device, base, monkeypatch):
    """output_needed=False (a checkpointed layer's recompute): the down projection's base matmul is not run, and
    every gradient equals the full forward's, bit for bit (the same matmuls on the same operands)."""
    import sys

    lora_mlp_module = sys.modules[LoRAMLPFunction.__module__]  # the package exports a function of the same name

    weights = _make_weights(MLP, torch.float32, "dense" if base == "dense" else "reference", device)
    x = _inputs(torch.float32, device)
    outs, leaves = _ours(lora_mlp, x, weights, 2.0, "silu")
    grads = _backward(outs)

    projected = []
    real_project = lora_mlp_module.project_forward
    monkeypatch.setattr(
        lora_mlp_module, "project_forward", lambda x2, w, *rest: projected.append(w) or real_project(x2, w, *rest)
    )
    x2 = x.detach().clone().requires_grad_(True)
    skip_leaves, args = [x2], [x2]
    for ours, _, a, b in weights.values():
        a, b = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
        skip_leaves += [a, b]
        args += [ours, a, b, 2.0]
    out = lora_mlp(*args, "silu", output_needed=False)
    assert out.shape == outs[0].shape
    torch.autograd.backward([out], grads)
    down_weight = weights["down_proj"][0]
    assert len(projected) == 2 and all(w is not down_weight for w in projected)
    for full, skipped in zip(leaves, skip_leaves, strict=True):
        torch.testing.assert_close(skipped.grad, full.grad, atol=0, rtol=0)


QKV_CONFIGS = {
    "separate": dict(variant="separate"),
    "fused-per-projection": dict(variant="fused", dense_concat=False, dy_concat=False),
    "fused-stacked": dict(variant="fused", dense_concat=True, dy_concat=True),
    "fused-stacked-per-dy": dict(variant="fused", dense_concat=True, dy_concat=False),
}


@pytest.mark.parametrize("kind,config", [("linear", None), ("mlp", None), *(("qkv", c) for c in QKV_CONFIGS)])
def test_rank_terms_are_written_first_and_base_matmuls_accumulate_onto_them(device, monkeypatch, kind, config):
    """No matmul with K = r accumulates onto its output (a pure memory pass over a (T, out) output, or over dx): the
    rank-r terms are written first, by a plain matmul or an ``addmm_`` with beta=0 (which does not read its output),
    and only the base matmuls (K = in or out features) accumulate with ``addmm_``. Reverting to
    ``y = x @ W.T; y.addmm_(xa, B.T)`` (or ``dx.addmm_(dxa, A)``) fails here."""
    if config is not None:
        qkv_module = sys.modules[LoRAQKVFunction.__module__]  # the package exports a function of the same name
        for key, value in QKV_CONFIGS[config].items():
            monkeypatch.setitem(qkv_module.CONFIG, key, value)
    shapes, op, _ = OPS[kind]
    weights = _make_weights(shapes, torch.float32, "dense", device)
    calls = []  # (phase, output shape, K, beta) of every addmm_
    phase = ["forward"]
    real_addmm_ = torch.Tensor.addmm_

    def spy_addmm_(self, mat1, mat2, *args, **kwargs):
        calls.append((phase[0], tuple(self.shape), mat1.shape[1], kwargs.get("beta", 1)))
        return real_addmm_(self, mat1, mat2, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "addmm_", spy_addmm_)
        outs, leaves = _ours(op, _inputs(torch.float32, device), weights, 2.0, "silu" if kind == "mlp" else None)
        phase[0] = "backward"
        _backward(outs)

    assert all(leaf.grad is not None for leaf in leaves)
    # K of a rank-r matmul: r, or up to 3 r for the adapters of q, k, v concatenated; every base K here is larger
    assert 3 * RANK < min(min(shape) for shape in shapes.values())
    rank_in_place = [c for c in calls if c[2] <= 3 * RANK and c[3] != 0]
    assert not rank_in_place, f"a rank-r matmul accumulated in place onto its output: {rank_in_place}"
    # the base matmuls did accumulate in place, in both directions, dx included (the spy sees what it must see)
    base = [c for c in calls if c[2] > 3 * RANK]
    assert {"forward", "backward"} <= {p for p, *_ in base}
    assert any(p == "backward" and out == (TOKENS[0] * TOKENS[1], HIDDEN) for p, out, *_ in base)


def test_a_4bit_weight_is_checked_again_when_its_quant_state_is_replaced(device):
    """materialize_weight checks a 4-bit weight once, not on every dequantization, but a replaced quant_state (or
    data) is checked again: a malformed one raises instead of being read."""
    from swiftune_kernels.lora_linear import materialize_weight

    class Weight:  # like Params4bit: weak references allowed, .data and .quant_state
        pass

    dense = (torch.randn(INTERMEDIATE, HIDDEN, generator=torch.Generator().manual_seed(5))).to(device, torch.bfloat16)
    good = _quantize(dense, "reference")
    weight = Weight()
    weight.data, weight.quant_state = good.data, good.quant_state
    first = materialize_weight(weight, torch.float32)
    torch.testing.assert_close(materialize_weight(weight, torch.float32), first, atol=0, rtol=0)
    broken = types.SimpleNamespace(**vars(good.quant_state))
    broken.absmax = good.quant_state.absmax[:-1]  # one scale short
    weight.quant_state = broken
    with pytest.raises(ValueError, match="absmax"):
        materialize_weight(weight, torch.float32)


def test_recompute_reuses_the_forward_cast_of_an_adapter_unless_it_changed():
    """A checkpointed layer casts each fp32 adapter to the compute dtype in forward; its recompute takes that cast
    back instead of casting again, but not after the adapter changed in place (an optimizer step in between). A
    forward outside a checkpointed layer keeps nothing, and a freed adapter leaves no entry."""
    import gc

    from swiftune_kernels.lora_linear import adapter_operand
    from swiftune_kernels.offloaded_checkpoint import _CHECKPOINTED_FORWARD, _RECOMPUTING_LAYER

    casts = sys.modules[LoRALinearFunction.__module__]._CASTS
    a = torch.randn(RANK, HIDDEN)

    def cast_in(var, t):
        token = var.set(True)
        try:
            return adapter_operand(t, torch.bfloat16)
        finally:
            var.reset(token)

    adapter_operand(a, torch.bfloat16)  # an un-checkpointed forward
    assert id(a) not in casts
    forward_cast = cast_in(_CHECKPOINTED_FORWARD, a)
    assert cast_in(_RECOMPUTING_LAYER, a) is forward_cast  # the same tensor: no second cast
    assert cast_in(_RECOMPUTING_LAYER, a) is not forward_cast  # taken once: a second recompute casts afresh
    cast_in(_CHECKPOINTED_FORWARD, a)
    with torch.no_grad():
        a.add_(1.0)  # in place, as an optimizer step: the version counter moves
    assert torch.equal(cast_in(_RECOMPUTING_LAYER, a), a.to(torch.bfloat16))
    cast_in(_CHECKPOINTED_FORWARD, a)
    key = id(a)
    del a
    gc.collect()
    assert key not in casts
