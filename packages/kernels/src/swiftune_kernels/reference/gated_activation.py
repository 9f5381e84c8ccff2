"""Pure-torch gated activations (SwiGLU, GeGLU): the oracle and CPU fallback of ``swiftune_kernels.gated_activation``.

``h = act(gate) * up`` with ``act`` one of:

- ``"silu"``: ``g * sigmoid(g)`` (SwiGLU: Llama, Mistral, Qwen);
- ``"gelu"``: ``0.5 * g * (1 + erf(g / sqrt(2)))``, the exact GELU (GeGLU);
- ``"gelu_tanh"``: ``0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g**3)))`` (Gemma's ``gelu_pytorch_tanh``).

Computation is in float32 (float64 stays float64) and the result is stored in the input dtype.
"""

from __future__ import annotations

import math

import torch

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def activation(g: torch.Tensor, name: str) -> torch.Tensor:
    """``act(g)`` in the dtype of ``g``."""
    if name == "silu":
        return g * torch.sigmoid(g)
    if name == "gelu":
        return 0.5 * g * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
    if name == "gelu_tanh":
        return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g * g * g)))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}.")


def gated_activation(gate: torch.Tensor, up: torch.Tensor, name: str) -> torch.Tensor:
    """``act(gate) * up`` computed in float32 (float64 for float64 inputs), returned in the dtype of gate."""
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (activation(gate.to(compute), name) * up.to(compute)).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    return gated_activation(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate) * up``; ``approximate`` is ``"none"`` (erf) or ``"tanh"``, as in torch's ``F.gelu``."""
    return gated_activation(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
