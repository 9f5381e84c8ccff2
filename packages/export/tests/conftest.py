"""Base models and adapters written by hand: the export package reads files, so tests write the files."""

import json

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture
def base_dir(tmp_path):
    """A 'model' folder: two layers of q_proj and v_proj weights in bf16, an embedding, config and tokenizer files."""
    torch.manual_seed(0)
    folder = tmp_path / "base"
    folder.mkdir()
    tensors = {"model.embed_tokens.weight": torch.randn(50, 8, dtype=torch.bfloat16)}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            tensors[f"model.layers.{layer}.self_attn.{proj}.weight"] = torch.randn(12, 8, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _write_adapter(folder, base_dir, modules, r=4, alpha=8, **config):
    """Write a peft-style LoRA adapter for ``modules`` (base weight names without '.weight')."""
    folder.mkdir(parents=True)
    tensors = {}
    for module in modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, 8)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(12, r)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": str(base_dir)}
    settings.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder, tensors


@pytest.fixture
def adapter(tmp_path, base_dir):
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    return _write_adapter(tmp_path / "adapter", base_dir, modules)


@pytest.fixture
def write_adapter():
    """The adapter writer, for tests that need an adapter of their own."""
    return _write_adapter
