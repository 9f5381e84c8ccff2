"""The architectures with a fast path, one small file each, gathered in one table keyed by ``model_type``."""

from __future__ import annotations

from swiftune_loader.architectures import (
    cohere,
    gemma,
    gemma2,
    gemma3,
    granite,
    llama,
    mistral,
    phi3,
    qwen2,
    qwen3,
)
from swiftune_loader.architectures.spec import ArchitectureSpec

SPECS: dict[str, ArchitectureSpec] = {
    module.SPEC.model_type: module.SPEC
    for module in (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, granite, phi3, cohere)
}


def spec_for(model_type: str) -> ArchitectureSpec | None:
    """The spec of ``model_type``, or None when swiftune has no fast path for it."""
    return SPECS.get(model_type)


__all__ = ["SPECS", "ArchitectureSpec", "spec_for"]
