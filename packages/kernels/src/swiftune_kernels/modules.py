"""nn.Module wrappers of the ops, with parameters named and shaped like transformers' so state_dicts load.

Each module only holds parameters and calls its functional; the functional dispatches (Triton or reference).
"""

from __future__ import annotations

import torch
from torch import nn

from swiftune_kernels.layer_norm import layer_norm
from swiftune_kernels.rms_norm import CASTINGS, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; see :func:`swiftune_kernels.rms_norm.rms_norm`.

    ``offset=0.0, casting="llama"`` matches LlamaRMSNorm (and Mistral, Qwen2/3, Phi3); ``offset=1.0,
    casting="gemma"`` matches GemmaRMSNorm. The weight is initialised so that ``offset + weight`` is 1.

    Args:
        hidden_size: size of the last dimension.
        eps: added to the mean square before the reciprocal square root.
        offset: 0.0 (weight used as given) or 1.0 (``1 + weight``).
        casting: "llama" or "gemma".
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        casting: str = "llama",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if casting not in CASTINGS:
            raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}.")
        self.hidden_size = hidden_size
        self.eps = eps
        self.offset = offset
        self.casting = casting
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps, self.offset, self.casting)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, offset={self.offset}, casting={self.casting!r}"


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension; see :func:`swiftune_kernels.layer_norm.layer_norm`.

    Parameters ``weight`` (ones) and ``bias`` (zeros, or None when ``bias=False``), as ``torch.nn.LayerNorm``.

    Args:
        hidden_size: size of the last dimension.
        eps: added to the variance before the reciprocal square root.
        bias: whether the module has a learnable bias.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return layer_norm(hidden_states, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}"
