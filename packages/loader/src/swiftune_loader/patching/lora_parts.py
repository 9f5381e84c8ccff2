"""Reading a peft LoRA layer as the (W, A, B, scale) that swiftune's fused LoRA functions take.

The fused functions apply only where they compute exactly what peft computes: one active adapter, not merged,
no dropout, no DoRA, no bias on the base layer, and a base weight that is a frozen float tensor or a
bitsandbytes 4-bit weight. Everything else returns None, and the caller keeps peft's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAParts:
    """The tensors of one LoRA projection: ``x @ weight.T + scale * (x @ a.T) @ b.T``."""

    weight: object
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def lora_parts(layer) -> LoRAParts | None:
    """The parts of a peft LoRA ``layer`` when the fused path computes what peft would; None otherwise."""
    adapters = getattr(layer, "active_adapters", None)
    if (
        not adapters
        or len(adapters) != 1
        or getattr(layer, "disable_adapters", False)
        or getattr(layer, "merged", True)
    ):
        return None
    name = adapters[0]
    if name not in getattr(layer, "lora_A", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.get_base_layer()
    if getattr(base, "bias", None) is not None:
        return None
    weight = base.weight
    quantized = hasattr(weight, "quant_state") and weight.quant_state is not None
    if not quantized and (not isinstance(base, torch.nn.Linear) or weight.requires_grad):
        return None
    return LoRAParts(weight, layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]))


def fusable_input(x: torch.Tensor, parts: list[LoRAParts | None]) -> bool:
    """Whether every projection has parts and their float base weights share ``x``'s dtype (as the kernels need)."""
    if any(p is None for p in parts):
        return False
    return all(hasattr(p.weight, "quant_state") or p.weight.dtype == x.dtype for p in parts)
