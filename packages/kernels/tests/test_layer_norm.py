"""LayerNorm: the Triton path (the interpreter on CPU) against the float64 reference, dispatch, errors, module."""

import importlib

import pytest
import torch

from swiftune_kernels.layer_norm import LayerNormFunction, layer_norm
from swiftune_kernels.modules import LayerNorm
from swiftune_kernels.reference.layer_norm import layer_norm as reference

# The package re-exports the function layer_norm under the submodule's name, so fetch the module itself.
op = importlib.import_module("swiftune_kernels.layer_norm")

EPS = 1e-5
# Narrow rows packed 32 to a program (and 111 rows: a ragged last block), 4 rows per program, one wide row
# (BLOCK_N 8192) per program.
SHAPES = [(3, 37, 123), (5, 1000), (2, 3, 4099)]


def _inputs(shape, dtype, device, has_bias=True, weight_trainable=True, bias_trainable=True):
    gen = torch.Generator().manual_seed(sum(shape))
    # A mean of 3 next to a std of 2: a kernel that forgot to centre, or centred badly, shows.
    x = (3.0 + 2.0 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_()
    weight = (1.0 + 0.2 * torch.randn(shape[-1], generator=gen)).to(device, dtype).requires_grad_(weight_trainable)
    bias = None
    if has_bias:
        bias = (0.2 * torch.randn(shape[-1], generator=gen)).to(device, dtype).requires_grad_(bias_trainable)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    return x, weight, bias, dy


def _oracle(x, weight, bias, dy):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    y64 = reference(x64, w64, b64, EPS)
    y64.backward(dy.double())
    return y64, x64.grad, w64.grad, None if b64 is None else b64.grad


@pytest.mark.parametrize("trainable", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_float64_reference(dtype, shape, has_bias, trainable, device, tolerance):
    # The weight and bias gradients accumulate exact float32 products over rows and are rounded once at the
    # end, so the one tolerance table holds for them too.
    x, weight, bias, dy = _inputs(shape, dtype, device, has_bias, trainable, trainable)
    y = layer_norm(x, weight, bias, EPS)
    y.backward(dy)
    y64, dx64, dw64, db64 = _oracle(x, weight, bias, dy)

    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y64, **tolerance(dtype))
    torch.testing.assert_close(x.grad.double(), dx64, **tolerance(dtype))
    if trainable:
        torch.testing.assert_close(weight.grad.double(), dw64, **tolerance(dtype))
        if has_bias:
            torch.testing.assert_close(bias.grad.double(), db64, **tolerance(dtype))
    else:
        assert weight.grad is None
        assert bias is None or bias.grad is None


@pytest.mark.parametrize(("weight_trainable", "bias_trainable"), [(True, True), (True, False), (False, True)])
def test_parameter_gradient_work_only_when_required(weight_trainable, bias_trainable, device, monkeypatch, tolerance):
    calls = []
    launcher = op.layer_norm_backward

    def spy(*args, **kwargs):
        result = launcher(*args, **kwargs)
        calls.append((kwargs["compute_dw"], kwargs["compute_db"]))
        return result

    monkeypatch.setattr(op, "layer_norm_backward", spy)
    x, weight, bias, dy = _inputs((3, 37, 123), torch.float32, device, True, weight_trainable, bias_trainable)
    layer_norm(x, weight, bias, EPS).backward(dy)
    assert calls == [(weight_trainable, bias_trainable)]
    _, dx64, dw64, db64 = _oracle(x, weight, bias, dy)
    torch.testing.assert_close(x.grad.double(), dx64, **tolerance(torch.float32))
    if weight_trainable:
        torch.testing.assert_close(weight.grad.double(), dw64, **tolerance(torch.float32))
    else:
        assert weight.grad is None
    if bias_trainable:
        torch.testing.assert_close(bias.grad.double(), db64, **tolerance(torch.float32))
    else:
        assert bias.grad is None


def test_non_contiguous_input_and_gradient(device, tolerance):
    base = torch.randn(3, 123, 37, device=device)
    x = base.transpose(1, 2).requires_grad_()  # (3, 37, 123) with column stride 37
    weight = torch.randn(123, device=device, requires_grad=True)
    bias = torch.randn(123, device=device, requires_grad=True)
    dy = torch.randn(3, 123, 37, device=device).transpose(1, 2)
    y = layer_norm(x, weight, bias, EPS)
    y.backward(dy)
    y64, dx64, dw64, db64 = _oracle(x, weight, bias, dy)
    torch.testing.assert_close(y.double(), y64, **tolerance(torch.float32))
    torch.testing.assert_close(x.grad.double(), dx64, **tolerance(torch.float32))
    torch.testing.assert_close(weight.grad.double(), dw64, **tolerance(torch.float32))
    torch.testing.assert_close(bias.grad.double(), db64, **tolerance(torch.float32))


def test_row_strided_view_and_broadcast_gradient(device, tolerance):
    # A column slice keeps unit column stride but a row stride of 200 (no copy); y.sum() hands backward a
    # gradient expanded with stride 0.
    x = torch.randn(37, 200, device=device)[:, :123].requires_grad_()
    weight = torch.randn(123, device=device, requires_grad=True)
    bias = torch.randn(123, device=device, requires_grad=True)
    layer_norm(x, weight, bias, EPS).sum().backward()
    _, dx64, dw64, db64 = _oracle(x, weight, bias, torch.ones(37, 123, device=device))
    torch.testing.assert_close(x.grad.double(), dx64, **tolerance(torch.float32))
    torch.testing.assert_close(weight.grad.double(), dw64, **tolerance(torch.float32))
    torch.testing.assert_close(bias.grad.double(), db64, **tolerance(torch.float32))


def test_empty_input(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    bias = torch.randn(16, device=device, requires_grad=True)
    y = layer_norm(x, weight, bias)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros(16, device=device))
    assert torch.equal(bias.grad, torch.zeros(16, device=device))


def test_cpu_takes_reference_without_interpreter(reference_only, monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton path was taken")

    monkeypatch.setattr(LayerNormFunction, "apply", fail)
    x, weight, bias, _ = _inputs((3, 5, 7), torch.bfloat16, "cpu")
    assert torch.equal(layer_norm(x, weight, bias, EPS), reference(x, weight, bias, EPS))


@pytest.fixture(params=["triton", "reference"])
def either_path(request, monkeypatch):
    """Run a test once on the Triton path and once on the reference path: both must check their inputs."""
    if request.param == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_parameter_shape_mismatch_is_refused(either_path):
    x = torch.randn(2, 8, device=either_path)
    ones = torch.ones(8, device=either_path)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        layer_norm(x, torch.ones(7, device=either_path), ones)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        layer_norm(x, ones, torch.ones(2, 8, device=either_path))


def test_bad_dtype_and_device_are_refused(either_path):
    x = torch.randn(2, 8, device=either_path)
    ones = torch.ones(8, device=either_path)
    with pytest.raises(TypeError, match="x must be float32"):
        layer_norm(x.to(torch.int64), ones)
    with pytest.raises(TypeError, match="bias must be float32"):
        layer_norm(x, ones, ones.to(torch.int32))
    with pytest.raises(ValueError, match="bias on meta"):
        layer_norm(x, ones, torch.zeros(8, device="meta"))


@pytest.mark.parametrize("bias", [True, False])
def test_module_loads_torch_state_dict_and_matches(bias, device, tolerance):
    torch_norm = torch.nn.LayerNorm(123, eps=EPS, bias=bias, device=device)
    with torch.no_grad():
        for param in torch_norm.parameters():
            param.normal_()
    ours = LayerNorm(123, eps=EPS, bias=bias, device=device)
    ours.load_state_dict(torch_norm.state_dict())
    assert list(ours.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    x = torch.randn(3, 37, 123, device=device)
    torch.testing.assert_close(ours(x), torch_norm(x), **tolerance(torch.float32))
