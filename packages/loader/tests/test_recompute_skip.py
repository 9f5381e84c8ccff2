"""The recompute of a checkpointed layer skips the MLP's down projection where the architecture only adds the MLP's
output to the residual, and the gradients stay those of the un-checkpointed model; elsewhere nothing is skipped."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swiftune_loader.architectures import spec_for
from swiftune_loader.checkpointing import disable_checkpointing, enable_checkpointing
from swiftune_loader.patching import patch_model
from swiftune_loader.testing import tiny_config

SMALL = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    head_dim=12,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(model_type: str):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **SMALL), dtype=torch.float32)
    patch_model(model)
    torch.manual_seed(3)
    # init_lora_weights=False: B is random too, so every adapter gets a non-zero gradient.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, config).train()


def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["llama", "granite", "cohere", "gemma2"])
def test_recompute_skips_the_down_projection_only_where_nothing_reads_it(monkeypatch, model_type):
    import swiftune_loader.patching.forwards as forwards

    output_needed = []
    original = forwards.lora_mlp
    monkeypatch.setattr(
        forwards, "lora_mlp", lambda *a, **k: output_needed.append(k.get("output_needed", True)) or original(*a, **k)
    )
    ids = torch.randint(3, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    model = _lora_model(model_type)
    reference = _grads(model, ids)
    layers = SMALL["num_hidden_layers"]
    assert output_needed == [True] * layers

    output_needed.clear()
    base = model.get_base_model()
    enable_checkpointing(base, "offload")  # on the CPU: every layer checkpointed and recomputed
    grads = _grads(model, ids)
    disable_checkpointing(base)

    skips = spec_for(model_type).mlp_output_to_residual
    # Gemma 2's post-feedforward norm reads the MLP's output in backward: its recompute must compute it.
    assert skips == (model_type != "gemma2")
    assert output_needed == [True] * layers + [not skips] * layers
    assert grads.keys() == reference.keys() and any("down_proj.lora_B" in name for name in grads)
    for name, expected in reference.items():
        torch.testing.assert_close(grads[name], expected, atol=1e-6, rtol=1e-5, msg=name)
