"""FastVisionModel.get_peft_model puts adapters exactly where the four role switches (and "all-linear") say.

The expected modules are read from each tiny model's structure by attribute access (the vision blocks' attention
and MLP, the language layers' self-/cross-attention and MLP, the projector), not from the role rules under test.
"""

import copy
import itertools

import pytest
import torch
from peft.tuners.lora import LoraLayer

from swiftune_loader.vision import FastVisionModel
from swiftune_loader.vision.testing import TINY_ARCHITECTURES, build_tiny_vision_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

SWITCHES = list(itertools.product((True, False), repeat=4))  # vision, language, attention, mlp


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    tokenizer = build_chat_tokenizer()
    models = {}
    for architecture in TINY_ARCHITECTURES:
        folder = build_tiny_vision_model(tmp_path_factory.mktemp(architecture), architecture, tokenizer)
        models[architecture], _ = FastVisionModel.from_pretrained(folder, use_gradient_checkpointing=False)
    return models


def structural_roles(model, architecture) -> dict[tuple[str, str], set[str]]:
    """(component, kind) -> names of the linear layers there, found by walking each family's own attributes."""
    names = {id(module): name for name, module in model.named_modules()}

    def linears(containers):
        return {names[id(m)] for c in containers for m in c.modules() if isinstance(m, torch.nn.Linear)}

    inner = model.model
    if architecture in ("qwen2_vl", "qwen2_5_vl"):
        blocks, vision_attention, projector = list(inner.visual.blocks), "attn", [inner.visual.merger]
    elif architecture == "mllama":
        vision = inner.vision_model
        blocks = list(vision.transformer.layers) + list(vision.global_transformer.layers)
        vision_attention, projector = "self_attn", [inner.multi_modal_projector]
    else:  # llava (CLIP) and gemma3 (SigLIP)
        blocks, vision_attention = list(inner.vision_tower.encoder.layers), "self_attn"
        projector = [inner.multi_modal_projector]
    layers = list(inner.language_model.layers)
    # Llama 3.2 Vision interleaves cross-attention layers (cross_attn) with self-attention layers (self_attn).
    text_attention = [layer.self_attn if hasattr(layer, "self_attn") else layer.cross_attn for layer in layers]
    return {
        ("vision", "attention"): linears(getattr(block, vision_attention) for block in blocks),
        ("vision", "mlp"): linears(block.mlp for block in blocks),
        ("language", "attention"): linears(text_attention),
        ("language", "mlp"): linears(layer.mlp for layer in layers),
        ("projector", "other"): linears(projector),
    }


def adapted_modules(peft_model) -> set[str]:
    return {name for name, module in peft_model.get_base_model().named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_the_structural_roles_cover_every_linear_layer_but_the_lm_head(base_models, architecture):
    # Guards the expectations below: a linear layer the walk missed would go unchecked.
    model = base_models[architecture]
    roles = structural_roles(model, architecture)
    found = set().union(*roles.values())
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert linear - found == {"lm_head"}
    assert sum(len(names) for names in roles.values()) == len(found)  # no layer in two roles
    assert all(roles[key] for key in roles if key[0] != "projector")


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_each_switch_combination_adapts_exactly_its_roles(base_models, architecture):
    model = base_models[architecture]
    roles = structural_roles(model, architecture)
    for vision, language, attention, mlp in SWITCHES:
        switches = dict(
            finetune_vision_layers=vision,
            finetune_language_layers=language,
            finetune_attention_modules=attention,
            finetune_mlp_modules=mlp,
        )
        if not (vision or language) or not (attention or mlp):
            with pytest.raises(ValueError, match="no layer would be trained"):
                FastVisionModel.get_peft_model(copy.deepcopy(model), r=4, **switches)
            continue
        components = {c for c, on in (("vision", vision), ("language", language)) if on}
        kinds = {k for k, on in (("attention", attention), ("mlp", mlp)) if on}
        expected = set().union(*(roles[(c, k)] for c in components for k in kinds))
        peft_model = FastVisionModel.get_peft_model(copy.deepcopy(model), r=4, **switches)
        assert adapted_modules(peft_model) == expected, switches
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_all_linear_adapts_every_linear_layer_with_the_projector_but_not_the_lm_head(base_models, architecture):
    model = base_models[architecture]
    everything = set().union(*structural_roles(model, architecture).values())
    peft_model = FastVisionModel.get_peft_model(copy.deepcopy(model), r=4, target_modules="all-linear")
    assert adapted_modules(peft_model) == everything


def test_modules_to_save_trains_a_full_copy_of_the_lm_head_and_projector(base_models):
    model = base_models["llava"]
    peft_model = FastVisionModel.get_peft_model(
        copy.deepcopy(model), r=4, modules_to_save=["lm_head", "multi_modal_projector"]
    )
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in n for n in trainable)
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    assert not any("lm_head" in n or "multi_modal_projector" in n for n in adapted_modules(peft_model))


def test_explicit_target_modules_override_the_switches(base_models):
    model = base_models["qwen2_5_vl"]
    peft_model = FastVisionModel.get_peft_model(
        copy.deepcopy(model), r=4, finetune_vision_layers=False, target_modules=["model.visual.blocks.0.mlp.up_proj"]
    )
    assert adapted_modules(peft_model) == {"model.visual.blocks.0.mlp.up_proj"}


def test_qwen2_5_vl_vision_mlp_names_do_not_leak_into_language_only_targets(base_models):
    # Qwen2.5-VL's vision MLPs use the language model's names (gate_proj, up_proj, down_proj): name suffixes alone
    # would adapt both.
    model = base_models["qwen2_5_vl"]
    peft_model = FastVisionModel.get_peft_model(copy.deepcopy(model), r=4, finetune_vision_layers=False)
    adapted = adapted_modules(peft_model)
    assert any(n.endswith("mlp.gate_proj") for n in adapted)
    assert not any(n.startswith("model.visual") for n in adapted)
