"""The fused LoRA functions take a float32 input in the autocast dtype, as nn.Linear does under autocast."""

from __future__ import annotations

import pytest
import torch

from swiftune_kernels import lora_linear, lora_mlp, lora_qkv


def _proj(out_f, in_f, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    a = (torch.randn(4, in_f, generator=gen) * 0.1).requires_grad_()
    b = (torch.randn(out_f, 4, generator=gen) * 0.1).requires_grad_()
    return w, a, b, 0.5


def test_linear_under_autocast_casts_a_float32_input_like_nn_linear():
    x = torch.randn(3, 16, requires_grad=True)
    w, a, b, s = _proj(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, a, b, s)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    x2 = x.detach().bfloat16().requires_grad_()
    expected = lora_linear(x2, w, a, b, s)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    expected.float().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad.float(), rtol=0, atol=0)


def test_without_autocast_a_dtype_mismatch_is_still_an_error():
    x = torch.randn(3, 16)
    w16, a, b, s = _proj(8, 16)
    with pytest.raises(TypeError, match="cast x"):
        lora_linear(x, w16, a, b, s)  # outside autocast a mismatch is still the caller's to fix


def test_mlp_and_qkv_under_autocast_compute_in_bfloat16():
    x = torch.randn(2, 3, 16, requires_grad=True)
    gate, up, down = _proj(32, 16, seed=1), _proj(32, 16, seed=2), _proj(16, 32, seed=3)
    q, k, v = _proj(16, 16, seed=4), _proj(8, 16, seed=5), _proj(8, 16, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lora_mlp(x, *gate, *up, *down, activation="silu")
        qkv = lora_qkv(x, *q, *k, *v)
    assert h.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in qkv)
    torch.testing.assert_close(h, lora_mlp(x.detach().bfloat16(), *gate, *up, *down, activation="silu"))
    (h.float().sum() + sum(t.float().sum() for t in qkv)).backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_fused_functions_run_their_matmuls_with_autocast_off_and_restore_it(monkeypatch, device):
    """Autocast is switched off around the fused functions (their operands are already cast, and every matmul under
    autocast costs host time), and back on after them, also when they raise."""
    import importlib

    # the package exports functions of the same names as these modules
    linear_module = importlib.import_module("swiftune_kernels.lora_linear")
    mlp_module = importlib.import_module("swiftune_kernels.lora_mlp")

    seen = []
    original = linear_module.project_forward

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled(device.type))
        return original(*args, **kwargs)

    def on_device(parts):
        return tuple(p.detach().to(device).requires_grad_(p.requires_grad) if torch.is_tensor(p) else p for p in parts)

    monkeypatch.setattr(linear_module, "project_forward", spy)
    monkeypatch.setattr(mlp_module, "project_forward", spy)
    x = torch.randn(3, 16, device=device, requires_grad=True)
    w, a, b, s = on_device(_proj(8, 16))
    gate, up, down = (
        on_device(_proj(*shape, seed=seed)) for shape, seed in (((32, 16), 1), ((32, 16), 2), ((16, 32), 3))
    )
    with torch.autocast(device.type, dtype=torch.bfloat16):
        lora_linear(x, w, a, b, s)
        lora_mlp(x, *gate, *up, *down, activation="silu")
        assert torch.is_autocast_enabled(device.type)
        monkeypatch.setattr(linear_module, "project_forward", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            lora_linear(x, w, a, b, s)
        assert torch.is_autocast_enabled(device.type)
    assert seen == [False] * 4  # one projection, then gate, up and down
