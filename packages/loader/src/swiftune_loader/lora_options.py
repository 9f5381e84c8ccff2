"""Checking get_peft_model's options against the model before peft sees them, and saying where the fast path
steps aside."""

from __future__ import annotations

import logging
import re

import torch

logger = logging.getLogger(__name__)

# Linear layers of a decoder block, by the names transformers uses for Llama-family models.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Fused projections of Phi-3 / Phi-4, used when the model has none of the names above.
FUSED_LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def linear_layer_names(model) -> list[str]:
    """The distinct last names of the model's linear layers (nn.Linear and its quantized subclasses, GPT-2's
    Conv1D), sorted: what ``target_modules`` can name."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
    }
    return sorted(names)


def default_targets(model) -> list[str]:
    """The attention and MLP projections this model has; a clear error when it has none of the usual names."""
    names = set(linear_layer_names(model))
    # The naming scheme the model follows is the one with more of its names present (Phi-3 has o_proj too).
    present = max(([t for t in c if t in names] for c in (DEFAULT_LORA_TARGETS, FUSED_LORA_TARGETS)), key=len)
    if present:
        return present
    raise ValueError(
        f"None of the default LoRA targets {DEFAULT_LORA_TARGETS} exist in this model; pass target_modules=[...] "
        f"(its linear layers are {linear_layer_names(model)}) or target_modules='all-linear'."
    )


def check_target_modules(model, target_modules) -> None:
    """Raise a ValueError when a name in ``target_modules`` matches no module, listing the linear layer names.

    Names match as peft matches them: a module whose full name is the entry or ends with ``"." + entry``; a single
    string other than "all-linear" is a regular expression over full names. peft's own error for this does not
    say what the model has.
    """
    if target_modules is None or target_modules == "all-linear":
        return
    module_names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):
        missing = [] if any(re.fullmatch(target_modules, n) for n in module_names) else [target_modules]
    else:
        missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", "this")
        raise ValueError(
            f"target_modules {missing} match no module of this {model_type} model; its linear layers are "
            f"{linear_layer_names(model)}: pass some of those, or target_modules='all-linear'."
        )


def log_fused_lora_fallback(model, lora_dropout: float, use_dora: bool) -> None:
    """One log line when the model has swiftune's fast path but these adapters will run through peft's layers."""
    if getattr(model, "_swiftune_patch", None) is None:
        return
    reasons = [r for r, on in (("lora_dropout > 0", lora_dropout > 0), ("DoRA", use_dora)) if on]
    if reasons:
        logger.warning(
            "LoRA with %s runs through peft's layers: swiftune's fused LoRA kernels apply only without dropout and "
            "DoRA (the norm, RoPE and activation kernels still apply).",
            " and ".join(reasons),
        )
