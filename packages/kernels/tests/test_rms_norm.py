"""RMSNorm: the Triton path (the interpreter on CPU) against the float64 reference, dispatch, errors, module."""

import importlib

import pytest
import torch

from swiftune_kernels.modules import RMSNorm
from swiftune_kernels.reference.rms_norm import rms_norm as reference
from swiftune_kernels.rms_norm import RMSNormFunction, rms_norm

# The package re-exports the function rms_norm under the submodule's name, so fetch the module itself.
op = importlib.import_module("swiftune_kernels.rms_norm")

EPS = 1e-6
# Narrow rows packed 32 to a program (and 111 rows: a ragged last block), 4 rows per program, one wide row
# (BLOCK_N 8192) per program.
SHAPES = [(3, 37, 123), (5, 1000), (2, 3, 4099)]
FLAVOURS = [(0.0, "llama"), (1.0, "gemma"), (1.0, "llama"), (0.0, "gemma")]
# One bf16 rounding error relative to the value: bf16 has 8 significant bits, and Triton's interpreter
# truncates when it converts float32 to bf16 (one ulp, 2**-7 at worst; the GPU rounds to nearest, half that).
BF16_ROUNDING = 2.0**-7


def _inputs(shape, dtype, offset, device, trainable=True):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    # offset + weight stays near 1 but differs per column, so a wrong offset or a transposed weight shows.
    weight = (1.0 - offset + 0.2 * torch.randn(shape[-1], generator=gen)).to(device, dtype)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    return x, weight.requires_grad_(trainable), dy


def _oracle(x, weight, dy, offset, casting):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y64 = reference(x64, w64, EPS, offset, casting)
    y64.backward(dy.double())
    return y64, x64.grad, w64.grad


@pytest.mark.parametrize("trainable", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize(("offset", "casting"), FLAVOURS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_float64_reference(dtype, shape, offset, casting, trainable, device, tolerance):
    x, weight, dy = _inputs(shape, dtype, offset, device, trainable)
    y = rms_norm(x, weight, EPS, offset, casting)
    y.backward(dy)
    y64, dx64, dw64 = _oracle(x, weight, dy, offset, casting)

    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y64, **tolerance(dtype))
    torch.testing.assert_close(x.grad.double(), dx64, **tolerance(dtype))
    if not trainable:
        assert weight.grad is None
        return
    assert weight.grad.dtype == dtype
    atol = torch.full_like(dw64, tolerance(dtype)["atol"])
    if dtype == torch.bfloat16 and casting == "llama":
        # Llama's weight gradient sums dy * normed with normed rounded to bf16 (the forward multiplied the
        # weight by that rounded value); the float64 oracle does not round. Each term is then off by at most
        # BF16_ROUNDING of itself, so column j may be off by BF16_ROUNDING * sum_i |dy_ij * normed_ij|.
        x64 = x.detach().double()
        normed64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
        atol = atol + BF16_ROUNDING * (dy.double() * normed64).abs().reshape(-1, shape[-1]).sum(0)
    error = (weight.grad.double() - dw64).abs()
    bound = atol + tolerance(dtype)["rtol"] * dw64.abs()
    assert (error <= bound).all(), f"weight grad off by {(error - bound).max().item():.3g} beyond the bound"


@pytest.mark.parametrize("trainable", [True, False])
def test_weight_gradient_work_only_when_weight_requires_grad(trainable, device, monkeypatch):
    calls = []
    launcher = op.rms_norm_backward

    def spy(*args, **kwargs):
        dx, dw = launcher(*args, **kwargs)
        calls.append((kwargs["compute_dw"], dw))
        return dx, dw

    monkeypatch.setattr(op, "rms_norm_backward", spy)
    x, weight, dy = _inputs((4, 33), torch.float32, 0.0, device, trainable)
    rms_norm(x, weight).backward(dy)
    assert len(calls) == 1
    compute_dw, dw = calls[0]
    assert compute_dw is trainable and (dw is not None) is trainable
    assert (weight.grad is not None) is trainable


def test_casting_llama_rounds_normed_before_weight_gemma_after(device):
    # float16 makes the two orders differ by far more than a rounding: the normalised small entries
    # (~1.3e-8) underflow to 0 in float16 before Llama's weight multiplies them, while Gemma multiplies by
    # 1e3 in float32 first and gets a representable ~1.3e-5 (a float16 subnormal, quantum 6e-8).
    x = torch.full((2, 123), 1.2e-7)
    x[:, 0] = 100.0
    x = x.to(device, torch.float16)
    weight = torch.full((123,), 1e3, device=device, dtype=torch.float16)
    llama = rms_norm(x, weight, EPS, 0.0, "llama")
    gemma = rms_norm(x, weight - 1, EPS, 1.0, "gemma")
    assert (llama[:, 1:] == 0).all()
    assert (gemma[:, 1:].float() > 1e-5).all()
    torch.testing.assert_close(llama, reference(x, weight, EPS, 0.0, "llama"), atol=0, rtol=1e-2)
    torch.testing.assert_close(gemma, reference(x, weight - 1, EPS, 1.0, "gemma"), atol=0, rtol=1e-2)


def test_non_contiguous_input_and_gradient(device, tolerance):
    base = torch.randn(3, 123, 37, device=device)
    x = base.transpose(1, 2).requires_grad_()  # (3, 37, 123) with column stride 37
    weight = torch.randn(123, device=device, requires_grad=True)
    dy = torch.randn(3, 123, 37, device=device).transpose(1, 2)
    y = rms_norm(x, weight)
    y.backward(dy)
    y64, dx64, dw64 = _oracle(x, weight, dy, 0.0, "llama")
    torch.testing.assert_close(y.double(), y64, **tolerance(torch.float32))
    torch.testing.assert_close(x.grad.double(), dx64, **tolerance(torch.float32))
    torch.testing.assert_close(weight.grad.double(), dw64, **tolerance(torch.float32))


def test_row_strided_view_and_broadcast_gradient(device, tolerance):
    # A column slice keeps unit column stride but a row stride of 200 (no copy); y.sum() hands backward a
    # gradient expanded with stride 0.
    x = torch.randn(37, 200, device=device)[:, :123].requires_grad_()
    weight = torch.randn(123, device=device, requires_grad=True)
    rms_norm(x, weight, EPS, 1.0, "gemma").sum().backward()
    _, dx64, dw64 = _oracle(x, weight, torch.ones(37, 123, device=device), 1.0, "gemma")
    torch.testing.assert_close(x.grad.double(), dx64, **tolerance(torch.float32))
    torch.testing.assert_close(weight.grad.double(), dw64, **tolerance(torch.float32))


def test_empty_input(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    y = rms_norm(x, weight)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros(16, device=device))


def test_cpu_takes_reference_without_interpreter(reference_only, monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton path was taken")

    monkeypatch.setattr(RMSNormFunction, "apply", fail)
    x, weight, _ = _inputs((3, 5, 7), torch.bfloat16, 1.0, "cpu")
    assert torch.equal(rms_norm(x, weight, EPS, 1.0, "gemma"), reference(x, weight, EPS, 1.0, "gemma"))


@pytest.fixture(params=["triton", "reference"])
def either_path(request, monkeypatch):
    """Run a test once on the Triton path and once on the reference path: both must check their inputs."""
    if request.param == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_weight_shape_mismatch_is_refused(either_path):
    x = torch.randn(2, 8, device=either_path)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(7, device=either_path))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(1, 8, device=either_path))


def test_bad_dtype_device_and_casting_are_refused(either_path):
    x = torch.randn(2, 8, device=either_path)
    with pytest.raises(TypeError, match="x must be float32"):
        rms_norm(x.to(torch.int32), torch.ones(8, device=either_path))
    with pytest.raises(TypeError, match="weight must be float32"):
        rms_norm(x, torch.ones(8, device=either_path, dtype=torch.float64))
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="casting must be one of"):
        rms_norm(x, torch.ones(8, device=either_path), casting="mistral")


def test_rows_too_wide_for_registers_are_refused(device):
    x = torch.randn(1, 65537, device=device)
    with pytest.raises(ValueError, match="larger than the 65536"):
        rms_norm(x, torch.ones(65537, device=device))


def test_module_loads_torch_state_dict_and_matches(device, tolerance):
    torch_norm = torch.nn.RMSNorm(123, eps=EPS, device=device)
    with torch.no_grad():
        torch_norm.weight.normal_()
    ours = RMSNorm(123, eps=EPS, device=device)
    ours.load_state_dict(torch_norm.state_dict())
    assert list(ours.state_dict()) == ["weight"]
    x = torch.randn(3, 37, 123, device=device)
    torch.testing.assert_close(ours(x), torch_norm(x), **tolerance(torch.float32))


def test_module_weight_starts_at_unit_scale(device):
    llama, gemma = RMSNorm(16, device=device), RMSNorm(16, offset=1.0, casting="gemma", device=device)
    assert torch.equal(llama.weight, torch.ones(16, device=device))
    assert torch.equal(gemma.weight, torch.zeros(16, device=device))
    x = torch.randn(4, 16, device=device)
    torch.testing.assert_close(llama(x), gemma(x))
    with pytest.raises(ValueError, match="casting must be one of"):
        RMSNorm(16, casting="phi")
