"""Choosing LoRA targets in a vision-language model by role: vision tower or language model, attention or MLP.

Every linear layer gets a role from where it sits: its component (the vision tower, a projector, the language
model, or the lm_head) from the model's layout (:mod:`swiftune_loader.vision.architectures`), and its kind from
the block part that holds it (a part named like ``self_attn``/``cross_attn``/``attention`` is attention, one named
like ``mlp``/``feed_forward``/``ffn`` is the MLP). Projectors and the lm_head are never chosen by the switches:
they are trained through ``target_modules="all-linear"`` (projectors) or ``modules_to_save`` (full copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swiftune_loader.vision.architectures import VisionLanguageLayout, layout_of

_ATTENTION_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class LinearRole:
    """Where a linear layer sits.

    Attributes:
        component: "vision", "projector", "language", "lm_head" or "other" (outside the known parts).
        kind: "attention", "mlp" or "other" (e.g. a patch embedding's projection).
    """

    component: str
    kind: str


def linear_roles(model: torch.nn.Module) -> dict[str, LinearRole]:
    """The role of every linear layer of ``model`` (a transformers vision-language model), by module name.

    Linear layers inside ``nn.MultiheadAttention`` are left out: that module reads their weights directly, so an
    adapter on them would never run.

    Raises:
        ValueError: the model's vision tower or language model cannot be found.
    """
    layout = layout_of(model)
    if layout is None:
        raise ValueError(
            f"swiftune cannot tell the vision tower from the language model in this {type(model).__name__}; "
            "pass target_modules=[...] (module names) or target_modules='all-linear'."
        )
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside_multihead = {
        id(child)
        for module in model.modules()
        if isinstance(module, torch.nn.MultiheadAttention)
        for child in module.modules()
    }
    roles = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or id(module) in inside_multihead:
            continue
        if module is output:
            roles[name] = LinearRole("lm_head", "other")
            continue
        component, root = _component(name, layout)
        roles[name] = LinearRole(component, _kind(name, root) if component in ("vision", "language") else "other")
    return roles


def role_targets(
    model: torch.nn.Module,
    finetune_vision_layers: bool = True,
    finetune_language_layers: bool = True,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
) -> list[str]:
    """The names of the linear layers the four switches choose, sorted.

    Args:
        model: a transformers vision-language model (not a peft wrapper).
        finetune_vision_layers: adapt the vision tower's blocks.
        finetune_language_layers: adapt the language model's layers.
        finetune_attention_modules: adapt the attention projections of the chosen components.
        finetune_mlp_modules: adapt the MLP projections of the chosen components.

    Raises:
        ValueError: the switches choose nothing, or the model has no such layers.
    """
    if not (finetune_vision_layers or finetune_language_layers):
        raise ValueError(
            "finetune_vision_layers and finetune_language_layers are both False, so no layer would be trained; "
            "turn one on, or pass target_modules=[...]."
        )
    if not (finetune_attention_modules or finetune_mlp_modules):
        raise ValueError(
            "finetune_attention_modules and finetune_mlp_modules are both False, so no layer would be trained; "
            "turn one on, or pass target_modules=[...]."
        )
    components = {"vision"} if finetune_vision_layers else set()
    components |= {"language"} if finetune_language_layers else set()
    kinds = {"attention"} if finetune_attention_modules else set()
    kinds |= {"mlp"} if finetune_mlp_modules else set()
    chosen = sorted(n for n, r in linear_roles(model).items() if r.component in components and r.kind in kinds)
    if not chosen:
        raise ValueError(
            f"No linear layer of this {type(model).__name__} is a {'/'.join(sorted(kinds))} layer of the "
            f"{' or '.join(sorted(components))} model; pass target_modules=[...] to choose them by name."
        )
    return chosen


def all_linear_targets(model: torch.nn.Module) -> list[str]:
    """Every linear layer but the lm_head (vision tower, projectors, language model and anything else), sorted.

    This is peft's meaning of "all-linear": the output layer is trained, when wanted, through
    ``modules_to_save=["lm_head"]``.
    """
    return sorted(n for n, r in linear_roles(model).items() if r.component != "lm_head")


def _component(name: str, layout: VisionLanguageLayout) -> tuple[str, str]:
    """The component holding module ``name`` and that component's path (projectors first: Qwen's merger sits
    inside the vision tower)."""
    for path in layout.projectors:
        if _inside(name, path):
            return "projector", path
    if _inside(name, layout.vision_tower):
        return "vision", layout.vision_tower
    if _inside(name, layout.language_model):
        return "language", layout.language_model
    return "other", ""


def _kind(name: str, root: str) -> str:
    parts = name[len(root) :].strip(".").split(".")[:-1]  # the layer's own name says nothing of the block part
    for part in parts:
        lowered = part.lower()
        if any(marker in lowered for marker in _ATTENTION_PARTS):
            return "attention"
        if any(marker in lowered for marker in _MLP_PARTS):
            return "mlp"
    return "other"


def _inside(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")
