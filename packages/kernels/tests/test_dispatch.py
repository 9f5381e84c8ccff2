import pytest
import torch

from swiftune_kernels.dispatch import check_floating, check_same_device, use_triton


def test_cpu_tensor_uses_reference_without_interpreter(reference_only):
    assert not use_triton(torch.zeros(2))


def test_cpu_tensor_uses_triton_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.zeros(2))


def test_integer_tensor_is_refused_with_advice():
    with pytest.raises(TypeError, match="must be float32, float16 or bfloat16"):
        check_floating("x", torch.zeros(2, dtype=torch.int64))


def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="one device"):
        check_same_device(x=torch.zeros(1), w=torch.zeros(1, device="meta"))
