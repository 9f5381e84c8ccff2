"""Switching gradient checkpointing on and off on a transformers model: transformers' own, or swiftune's offloaded
checkpointing (each decoder layer's input parked in pinned CPU memory until backward)."""

from __future__ import annotations

import torch

from swiftune_kernels import apply_offloaded_checkpointing


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The decoder layers of a transformers causal LM (``model.model.layers``), or None when it has none."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def enable_checkpointing(model, mode) -> None:
    """Turn on checkpointing ``mode`` (True, "offload" or False) on the transformers ``model`` (not a peft wrapper).

    "offload" checkpoints each decoder layer and moves its input to pinned CPU memory where the input is large
    enough for that to pay (swiftune_kernels.checkpoint_policy); the layer is recomputed either way. A model with
    no decoder layers to wrap falls back to transformers' checkpointing.
    """
    if not mode:
        return
    layers = decoder_layers(model)
    if mode == "offload" and layers is not None:
        model._swiftune_offload = apply_offloaded_checkpointing(layers, policy="auto")
        return
    # Newer transformers 5 releases renamed gradient_* to activation_* (the old names warn). Either one also makes
    # the embeddings' output require grad, so that backward reaches checkpointed layers when embeddings are frozen.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_checkpointing(model):
    """Turn off whichever checkpointing is on; returns the mode that was on (True, "offload" or False)."""
    offload = model.__dict__.pop("_swiftune_offload", None)
    if offload is not None:
        offload.revert()
        return "offload"
    if transformers_checkpointing(model):
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        if getattr(model, "_require_grads_hooks", None):
            model.disable_input_require_grads()
        return True
    return False


def transformers_checkpointing(model) -> bool:
    """Whether transformers' own gradient checkpointing is on for ``model``."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
