"""The patching engine: swap norm modules and bind fast forwards on a built model, reversibly.

Nothing global changes: modules are replaced with ``setattr`` on their parent, and forwards are bound to single
instances (an instance attribute that shadows the class method) together with the few facts they read (prefixed
``_swiftune_``). ``PatchHandle.revert()`` undoes both.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch

from swiftune_kernels.modules import LayerNorm, RMSNorm
from swiftune_loader.architectures import ArchitectureSpec, spec_for
from swiftune_loader.patching.forwards import attention_forward, gated_mlp_forward

logger = logging.getLogger(__name__)

# Instance attributes a bound forward reads; revert() removes them with the forward.
_BOUND_ATTRIBUTES = (
    "forward",
    "_swiftune_activation",
    "_swiftune_qk_norm",
    "_swiftune_fused_qkv",
    "_swiftune_fused_gate_up",
    "_swiftune_interleaved_rope",
    "_swiftune_output_to_residual",
)


@dataclass
class PatchHandle:
    """What a patch changed, so that :meth:`revert` can put the model back as it was."""

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = field(default_factory=list)
    bound: list[torch.nn.Module] = field(default_factory=list)
    spec: ArchitectureSpec | None = None
    root: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def counts(self) -> dict[str, int]:
        """How many norms were swapped and how many forwards were bound."""
        return {"norms": len(self.swapped), "forwards": len(self.bound)}

    def revert(self) -> None:
        """Restore the original modules and forwards."""
        for parent, name, original in reversed(self.swapped):
            setattr(parent, name, original)
        for module in self.bound:
            for attribute in _BOUND_ATTRIBUTES:
                module.__dict__.pop(attribute, None)
        self.swapped.clear()
        self.bound.clear()

    @property
    def active(self) -> bool:
        """Whether the kernels are in the model now (patched and not reverted)."""
        return bool(self.swapped or self.bound)

    def reapply(self) -> None:
        """Put the kernels back into the same model after :meth:`revert` (the weights were never copied)."""
        if self.active or self.root is None:
            return
        again = patch_model(self.root, self.spec)
        self.swapped, self.bound = again.swapped, again.bound


def patch_model(model: torch.nn.Module, spec: ArchitectureSpec | None = None) -> PatchHandle:
    """Put swiftune's kernels into ``model`` where its architecture allows; returns the handle to undo it.

    Args:
        model: a transformers model (or a peft wrapper of one).
        spec: the architecture; by default looked up from ``model.config.model_type``.

    Raises:
        ValueError: the architecture has no fast path (callers decide whether that is a warning).
    """
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        spec = spec_for(model_type)
        if spec is None:
            raise ValueError(f"swiftune has no fast path for model_type={model_type!r}.")
    handle = PatchHandle(spec=spec, root=model)
    config = getattr(model, "config", None)
    activation = _activation(config, spec)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in spec.norm_class_names:
                fast = _fast_norm(child, spec)
                if fast is not None:
                    handle.swapped.append((parent, name, child))
                    setattr(parent, name, fast)
    for module in model.modules():
        class_name = type(module).__name__
        if class_name in spec.attention_class_names:
            module._swiftune_qk_norm = _qk_norm(config, spec)
            module._swiftune_fused_qkv = spec.fused_qkv
            module._swiftune_interleaved_rope = spec.rope == "interleaved"
            module.forward = types.MethodType(attention_forward, module)
            handle.bound.append(module)
        elif class_name in spec.mlp_class_names and activation is not None:
            module._swiftune_activation = activation
            module._swiftune_fused_gate_up = spec.fused_gate_up
            module._swiftune_output_to_residual = spec.mlp_output_to_residual
            module.forward = types.MethodType(gated_mlp_forward, module)
            handle.bound.append(module)
    logger.info("swiftune fast path for %s: %s", spec.model_type, handle.counts)
    return handle


# transformers' activation names -> the gated activations of swiftune_kernels.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def _activation(config, spec: ArchitectureSpec) -> str | None:
    """The gate activation the config asks for (None: one the kernels do not have, so MLPs stay as they are)."""
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if name is None:
        return spec.activation
    if name not in _ACTIVATIONS:
        logger.warning("No fused kernel for the activation %r: the MLPs keep transformers' code.", name)
    return _ACTIVATIONS.get(name)


def _qk_norm(config, spec: ArchitectureSpec) -> bool:
    """Whether the attention normalises each head of q and k: fixed by the spec, or read from a config flag."""
    if isinstance(spec.qk_norm, str):
        return bool(getattr(config, spec.qk_norm, False))
    return spec.qk_norm


def _fast_norm(original: torch.nn.Module, spec: ArchitectureSpec) -> RMSNorm | LayerNorm | None:
    """swiftune's norm sharing ``original``'s parameters, or None where the kernels cannot compute it.

    None for a weight of more than one dimension: Cohere's q/k norms scale each (head, channel) with its own
    weight, while the kernels take one weight vector for every row. Those modules keep transformers' code.
    """
    weight = original.weight
    if weight.dim() != 1:
        return None
    eps = getattr(original, "variance_epsilon", getattr(original, "eps", 1e-6))
    if spec.norm_kind == "layer_norm":
        bias = getattr(original, "bias", None)
        fast = LayerNorm(weight.shape[0], eps=eps, bias=bias is not None, device="meta")
        if bias is not None:
            fast.bias = bias
    else:
        fast = RMSNorm(weight.shape[0], eps=eps, offset=spec.norm_offset, casting=spec.norm_casting, device="meta")
    # Share the Parameter itself: same storage, same name in the state_dict, same requires_grad.
    fast.weight = weight
    return fast
