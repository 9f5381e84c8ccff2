"""Fused LoRA QKV, variant "fused" (stacked adapters, 4-bit bases dequantized into one buffer, one base matmul):
outputs and the gradients of x, A and B against the float64 reference, for dense and NF4 bases."""

import importlib
import types

import pytest
import torch

from swiftune_kernels.lora_qkv import LoRAQKVFunction, lora_qkv
from swiftune_kernels.reference import lora as reference
from swiftune_kernels.reference import nf4 as reference_nf4

# the module, not the function of the same name that the package exports
qkv_module = importlib.import_module("swiftune_kernels.lora_qkv")

HIDDEN, TOKENS = 64, (2, 7)
# (out_features, rank): q, k, v with different ranks, so that the stacked adapters are sliced unevenly
PROJECTIONS = [(64, 4), (16, 3), (16, 5)]
SCALES = (2.0, 0.5, 1.5)
CONFIGS = {
    "fused": dict(variant="fused"),
    "fused-all-concat": dict(variant="fused", dense_concat=True, dy_concat=True),
}
# float64 against float64: only the order of summation differs
EXACT = {"atol": 1e-10, "rtol": 1e-10}


def _quantize(weight, quantizer):
    if quantizer == "bitsandbytes":
        bnb = pytest.importorskip("bitsandbytes")
        param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        return param._quantize(weight.device)
    packed, state = reference_nf4.quantize_nf4(weight, 64, compress_statistics=True, nested_blocksize=4)
    return types.SimpleNamespace(data=packed, quant_state=state)


def _case(base, dtype, device, seed=0):
    """(x, [(weight for our op, the same weight dense in dtype, A, B, scale)]) on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*TOKENS, HIDDEN, generator=gen).to(device, dtype)
    projections = []
    for (out_f, rank), scale in zip(PROJECTIONS, SCALES, strict=True):
        w = (torch.randn(out_f, HIDDEN, generator=gen) / HIDDEN**0.5).to(device, torch.bfloat16)
        a = (torch.randn(rank, HIDDEN, generator=gen) / HIDDEN**0.5).to(device, torch.float32)  # as peft keeps them
        b = (torch.randn(out_f, rank, generator=gen) / rank**0.5).to(device, torch.float32)
        ours = w.to(dtype) if base == "dense" else _quantize(w, base)
        projections.append((ours, reference.dense_weight(ours, dtype), a, b, scale))
    return x, projections


def _run(op, x, projections, weights, grads_out=None, need=None):
    """Outputs, then the gradients of (x, A_q, B_q, ...) (None where not required) after a random backward."""
    need = need or [True] * 7
    leaves = [x.detach().clone().requires_grad_(need[0])]
    args = [leaves[0]]
    for i, ((_, _, a, b, scale), w) in enumerate(zip(projections, weights, strict=True)):
        a = a.detach().clone().to(x.dtype if x.dtype == torch.float64 else a.dtype).requires_grad_(need[1 + 2 * i])
        b = b.detach().clone().to(a.dtype).requires_grad_(need[2 + 2 * i])
        leaves += [a, b]
        args += [w, a, b, scale]
    outs = op(*args)
    if grads_out is None:
        gen = torch.Generator().manual_seed(5)
        grads_out = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(list(outs), [g.to(o.dtype) for g, o in zip(grads_out, outs, strict=True)])
    return outs, [leaf.grad for leaf in leaves], grads_out


def _oracle(x, projections, grads_out):
    """The reference in float64 on the weights as our op sees them (dequantized in x's dtype)."""
    dense = [p[1].double() for p in projections]
    cast = [(p[0], p[1], p[2].double(), p[3].double(), p[4]) for p in projections]
    return _run(reference.lora_qkv, x.double(), cast, dense, [g.double() for g in grads_out])


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("base", ["dense", "nf4-reference", "bitsandbytes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_float64_reference(device, tolerance, monkeypatch, config, base, dtype):
    for key, value in CONFIGS[config].items():
        monkeypatch.setitem(qkv_module.CONFIG, key, value)
    x, projections = _case("reference" if base == "nf4-reference" else base, dtype, device)
    outs, grads, grads_out = _run(lora_qkv, x, projections, [p[0] for p in projections])
    expected_outs, expected_grads, _ = _oracle(x, projections, grads_out)
    for got, want in zip(outs, expected_outs, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        _close(got, want.detach(), tolerance(dtype))
    assert grads[0].dtype == dtype
    _close(grads[0], expected_grads[0], tolerance(dtype))
    for got, want in zip(grads[1:], expected_grads[1:], strict=True):
        assert got.dtype == torch.float32  # adapter gradients come back in the adapters' own dtype
        _close(got, want, tolerance(dtype))


def _close(got, want, tol):
    # As in test_lora.py: errors come from roundings of whole (T, features) intermediates that matmuls then sum over
    # a feature axis, so an element's error scales with the tensor's scale, not with its own value (which can
    # cancel to ~0): the table's atol is applied relative to the tensor's largest value.
    torch.testing.assert_close(got.double(), want, atol=tol["atol"] * want.abs().max().item(), rtol=tol["rtol"])


@pytest.mark.parametrize("base", ["dense", "nf4-reference"])
def test_fused_equals_separate_in_float64(device, monkeypatch, base):
    x, projections = _case("reference" if base == "nf4-reference" else base, torch.float64, device)
    results = []
    for variant in ("separate", "fused"):
        monkeypatch.setitem(qkv_module.CONFIG, "variant", variant)
        monkeypatch.setitem(qkv_module.CONFIG, "dy_concat", variant == "fused")
        results.append(_run(lora_qkv, x, projections, [p[0] for p in projections]))
    for got, want in zip([*results[1][0], *results[1][1]], [*results[0][0], *results[0][1]], strict=True):
        torch.testing.assert_close(got, want, **EXACT)


def test_fused_skips_frozen_adapters_and_input(device, tolerance, monkeypatch):
    monkeypatch.setitem(qkv_module.CONFIG, "variant", "fused")
    x, projections = _case("reference", torch.float32, device)
    need = [False, True, False, False, True, True, False]  # x frozen, B_q frozen, A_k frozen, B_v frozen
    _, grads, grads_out = _run(lora_qkv, x, projections, [p[0] for p in projections], need=need)
    _, expected, _ = _oracle(x, projections, grads_out)
    for got, want, needed in zip(grads, expected, need, strict=True):
        if needed:
            _close(got, want, tolerance(torch.float32))
        else:
            assert got is None


def test_fused_outputs_reshape_into_heads_as_attention_does(device, monkeypatch):
    """q, k, v are column slices of one output: .view(b, s, heads, head_dim) must still work (no copy needed)."""
    monkeypatch.setitem(qkv_module.CONFIG, "variant", "fused")
    x, projections = _case("dense", torch.float32, device)
    args = [x]
    for w, _, a, b, scale in projections:
        args += [w, a, b, scale]
    q, k, v = lora_qkv(*args)
    separate = [reference.lora_linear(x, w, a, b, s) for w, _, a, b, s in projections]
    for out, want, heads in zip((q, k, v), separate, (8, 2, 2), strict=True):
        torch.testing.assert_close(out.view(*TOKENS, heads, -1), want.view(*TOKENS, heads, -1), rtol=1e-5, atol=1e-5)
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()  # one (tokens, q + k + v) buffer


def test_function_takes_the_variant_as_its_last_argument(device):
    x, projections = _case("dense", torch.float32, device)
    args = [x.requires_grad_()]
    for _, _, a, b, _ in projections:
        args += [a, b]
    weights, scales = [p[0] for p in projections], [p[4] for p in projections]
    fused = LoRAQKVFunction.apply(*args, *weights, *scales, "fused")
    separate = LoRAQKVFunction.apply(*args, *weights, *scales, "separate")
    for a, b in zip(fused, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
