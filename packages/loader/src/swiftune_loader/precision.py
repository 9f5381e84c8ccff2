"""Choosing the compute dtype and the device placement when the user leaves them open."""

from __future__ import annotations

import os

import torch

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype to load weights in: the given one, else bfloat16 on GPUs that support it, float16 on older GPUs,
    float32 on the CPU (where half-precision matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}.")
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)} or None, got '{dtype}'.")
        return _DTYPE_NAMES[dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device_map(device_map):
    """The device map: the given one, else this process's GPU when there is one, else the CPU.

    Under torchrun each process owns the GPU numbered by LOCAL_RANK; a 4-bit model cannot be moved after loading,
    so it must be loaded there.
    """
    if device_map is not None:
        return device_map
    return {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else {"": "cpu"}
