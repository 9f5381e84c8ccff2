"""SwiGLU and GeGLU: the Triton path (the interpreter on CPU) against the float64 reference, output and gradients."""

import pytest
import torch
import torch.nn.functional as F

from swiftune_kernels.gated_activation import GatedActivationFunction, gated_activation, geglu, swiglu
from swiftune_kernels.reference import gated_activation as reference

SHAPE = (3, 37, 123)
ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]
# The interpreter computes sigmoid(x) as 1 / (1 + exp(-x)) in numpy: exp overflows to inf for x < -88 and the
# result is the correct 0, but numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _inputs(device, dtype, shape=SHAPE):
    torch.manual_seed(0)
    # gate spread to +-12 so the tails of sigmoid, erf and tanh are exercised, not only the linear middle
    gate = (3.0 * torch.randn(shape, device=device)).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    return gate, up


def _check(gate, up, activation, tolerance, dh=None):
    gate = gate.detach().requires_grad_(True)
    up = up.detach().requires_grad_(True)
    h = gated_activation(gate, up, activation)
    if dh is None:
        torch.manual_seed(1)
        dh = torch.randn_like(h)
    h.backward(dh)

    gate64 = gate.detach().double().requires_grad_(True)
    up64 = up.detach().double().requires_grad_(True)
    h64 = reference.gated_activation(gate64, up64, activation)
    h64.backward(dh.double())

    tol = tolerance(gate.dtype)
    assert h.dtype == gate.dtype and h.shape == gate.shape
    torch.testing.assert_close(h.double(), h64.detach(), **tol)
    torch.testing.assert_close(gate.grad.double(), gate64.grad, **tol)
    torch.testing.assert_close(up.grad.double(), up64.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_output_and_gradients_match_reference(device, tolerance, dtype, activation):
    gate, up = _inputs(device, dtype)
    _check(gate, up, activation, tolerance)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_row_strided_views_from_a_fused_projection(device, tolerance, activation):
    """gate and up chunked from one (..., 2 * intermediate) tensor, and a non-contiguous output gradient."""
    torch.manual_seed(0)
    fused = 3.0 * torch.randn(3, 37, 2 * 123, device=device)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    dh = torch.randn(3, 123, 37, device=device).transpose(1, 2)  # (3, 37, 123), not contiguous
    _check(gate, up, activation, tolerance, dh=dh)


@pytest.mark.parametrize("frozen", ["gate", "up"])
def test_frozen_input_gets_no_gradient(device, tolerance, frozen):
    gate, up = _inputs(device, torch.float32)
    gate.requires_grad_(frozen != "gate")
    up.requires_grad_(frozen != "up")
    h = gated_activation(gate, up, "silu")
    dh = torch.randn_like(h)
    h.backward(dh)
    trained = up if frozen == "gate" else gate
    assert (gate.grad is None) == (frozen == "gate") and (up.grad is None) == (frozen == "up")

    gate64 = gate.detach().double().requires_grad_(True)
    up64 = up.detach().double().requires_grad_(True)
    reference.gated_activation(gate64, up64, "silu").backward(dh.double())
    expected = up64.grad if frozen == "gate" else gate64.grad
    torch.testing.assert_close(trained.grad.double(), expected, **tolerance(torch.float32))


def test_extreme_gates_stay_finite(device):
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], device=device, requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    for activation in ACTIVATIONS:
        h = gated_activation(gate, up, activation)
        h.sum().backward()
        assert torch.isfinite(h).all() and torch.isfinite(gate.grad).all() and torch.isfinite(up.grad).all()
        torch.testing.assert_close(h[[0, 1, 3]], torch.zeros(3, device=device), atol=1e-6, rtol=0)
        torch.testing.assert_close(h[-2:], gate.detach()[-2:])
        gate.grad = up.grad = None


def test_reference_is_torch_activation_times_up():
    """The oracle against torch's own silu and gelu (both GELU forms), in float64; low precision comes back as is."""
    gate, up = _inputs("cpu", torch.float64)
    torch.testing.assert_close(reference.swiglu(gate, up), F.silu(gate) * up)
    torch.testing.assert_close(reference.geglu(gate, up), F.gelu(gate) * up)
    torch.testing.assert_close(reference.geglu(gate, up, "tanh"), F.gelu(gate, approximate="tanh") * up)
    assert reference.swiglu(gate.bfloat16(), up.bfloat16()).dtype == torch.bfloat16


def test_swiglu_and_geglu_choose_their_activation(device):
    gate, up = _inputs(device, torch.float32)
    assert torch.equal(swiglu(gate, up), gated_activation(gate, up, "silu"))
    assert torch.equal(geglu(gate, up), gated_activation(gate, up, "gelu"))
    assert torch.equal(geglu(gate, up, approximate="tanh"), gated_activation(gate, up, "gelu_tanh"))
    assert not torch.equal(geglu(gate, up), geglu(gate, up, approximate="tanh"))


def test_reference_path_without_interpreter(reference_only, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran without the interpreter")

    monkeypatch.setattr(GatedActivationFunction, "apply", fail)
    gate, up = _inputs("cpu", torch.bfloat16)
    for activation in ACTIVATIONS:
        expected = reference.gated_activation(gate, up, activation)
        torch.testing.assert_close(gated_activation(gate, up, activation), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "gate, up, kwargs, error, match",
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), {}, ValueError, "same shape"),
        (torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bfloat16), {}, TypeError, "same dtype"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64), {}, TypeError, "float32"),
        (torch.zeros(3, 4), torch.zeros(3, 4, device="meta"), {}, ValueError, "one device"),
        (torch.zeros(3, 4), torch.zeros(3, 4), {"activation": "relu"}, ValueError, "activation must be one of"),
    ],
)
def test_mistakes_raise_clear_errors(gate, up, kwargs, error, match):
    with pytest.raises(error, match=match):
        gated_activation(gate, up, **kwargs)


def test_geglu_refuses_unknown_approximation():
    with pytest.raises(ValueError, match="approximate must be"):
        geglu(torch.zeros(2), torch.zeros(2), approximate="sigmoid")
