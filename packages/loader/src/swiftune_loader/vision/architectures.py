"""Where the parts of each vision-language model live, and the fast path of the language model inside it.

A vision-language model (transformers' ``*ForConditionalGeneration``) holds a vision tower, a projector that maps
image features into the language model's embedding space, a language model, and the lm_head. The layout table
names them by module path, one row per ``model_type``; models not in the table are read by the names transformers
uses across families. The language models' fast paths are the loader's architecture specs: the text model types
of Qwen2-VL, Qwen2.5-VL and Llama 3.2 Vision get their own specs here, because their modules carry their own class
names; LLaVA (a Llama, Mistral, Qwen2... inside) and Gemma 3 (``gemma3_text``) use the loader's specs as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swiftune_loader.architectures import ArchitectureSpec, spec_for


@dataclass(frozen=True)
class VisionLanguageLayout:
    """Module paths of the parts of a vision-language model.

    Attributes:
        vision_tower: the image encoder.
        projectors: the modules that map image features into the text embedding space (inside the vision tower
            for Qwen2-VL's patch merger); they count as projectors, not as vision layers.
        language_model: the decoder stack (without the lm_head).
    """

    vision_tower: str
    projectors: tuple[str, ...]
    language_model: str = "model.language_model"


LAYOUTS: dict[str, VisionLanguageLayout] = {
    "qwen2_vl": VisionLanguageLayout("model.visual", ("model.visual.merger",)),
    "qwen2_5_vl": VisionLanguageLayout("model.visual", ("model.visual.merger",)),
    "mllama": VisionLanguageLayout("model.vision_model", ("model.multi_modal_projector",)),
    "llava": VisionLanguageLayout("model.vision_tower", ("model.multi_modal_projector",)),
    "gemma3": VisionLanguageLayout("model.vision_tower", ("model.multi_modal_projector",)),
}

# Names transformers gives these parts across vision-language families, for models outside the table.
_VISION_TOWER_NAMES = ("model.visual", "model.vision_tower", "model.vision_model")
_PROJECTOR_NAMES = ("model.multi_modal_projector", "model.visual.merger", "model.connector", "model.mm_projector")

# Language models whose modules carry their own class names: Qwen2-VL's and Qwen2.5-VL's are Qwen2 layers with
# M-RoPE (the rotary module hands each attention one cos/sin per position, as Llama's does), Llama 3.2 Vision's
# self-attention layers are Llama layers (the fast attention reads their dropout, named ``dropout`` there); its
# cross-attention layers (``MllamaTextCrossAttention``: keys and values from the image, no RoPE) keep transformers'
# attention, while their norms and MLPs take the fast path.
VISION_TEXT_SPECS: dict[str, ArchitectureSpec] = {
    spec.model_type: spec
    for spec in (
        ArchitectureSpec(
            model_type="qwen2_vl_text",
            norm_class_names=("Qwen2VLRMSNorm",),
            norm_offset=0.0,
            norm_casting="llama",
            attention_class_names=("Qwen2VLAttention",),
            mlp_class_names=("Qwen2MLP",),
            activation="silu",
        ),
        ArchitectureSpec(
            model_type="qwen2_5_vl_text",
            norm_class_names=("Qwen2_5_VLRMSNorm",),
            norm_offset=0.0,
            norm_casting="llama",
            attention_class_names=("Qwen2_5_VLAttention",),
            mlp_class_names=("Qwen2MLP",),
            activation="silu",
        ),
        ArchitectureSpec(
            model_type="mllama_text_model",
            norm_class_names=("MllamaTextRMSNorm",),
            norm_offset=0.0,
            norm_casting="llama",
            attention_class_names=("MllamaTextSelfAttention",),
            mlp_class_names=("MllamaTextMLP",),
            activation="silu",
        ),
    )
}


def text_spec_for(text_model_type: str | None) -> ArchitectureSpec | None:
    """The fast-path spec of a vision-language model's language model, or None when it has none."""
    return VISION_TEXT_SPECS.get(text_model_type) or spec_for(text_model_type)


def layout_of(model: torch.nn.Module) -> VisionLanguageLayout | None:
    """The layout of ``model`` (a transformers vision-language model, not a peft wrapper), or None when its vision
    tower or language model cannot be found.

    Raises:
        ValueError: the table's paths are missing from a model of a listed type (a transformers change).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = LAYOUTS.get(model_type)
    if layout is not None:
        missing = [p for p in (layout.vision_tower, layout.language_model, *layout.projectors) if not _has(model, p)]
        if missing:
            raise ValueError(
                f"This {model_type} model has no module {missing[0]!r}, where swiftune expects it; the installed "
                "transformers may have renamed it: pass target_modules=[...] to choose LoRA targets by name."
            )
        return layout
    vision = next((p for p in _VISION_TOWER_NAMES if _has(model, p)), None)
    if vision is None or not _has(model, "model.language_model"):
        return None
    return VisionLanguageLayout(vision, tuple(p for p in _PROJECTOR_NAMES if _has(model, p)))


def _has(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
