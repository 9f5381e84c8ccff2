"""Where an op runs: Triton on CUDA, the reference on CPU, Triton's interpreter on CPU when asked."""

from __future__ import annotations

import os

import torch


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op called on ``tensor`` should launch its Triton kernel.

    CUDA tensors always do. CPU tensors do only when ``TRITON_INTERPRET=1`` is set, so that Triton's
    interpreter runs the kernel on the CPU; otherwise the pure-torch reference runs. The variable is read
    at call time, never at import.
    """
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """Raise a TypeError a user can act on when ``tensor`` is not float32, float16 or bfloat16."""
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}; cast it with .to(torch.bfloat16) "
            "or .float() first."
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise a ValueError naming the tensors when they do not all sit on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}; move them with .to(device) first.")
