"""What the safety refusals let through: pickle weights with allow_pickle=True, and an auto_map that transformers'
own classes cover (no code from the folder runs)."""

from __future__ import annotations

import json
import shutil

import pytest


def _logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8]])).logits


def test_pickle_weights_load_with_allow_pickle_and_give_the_same_model(assets, loaded_model):
    import torch

    from swiftune_loader import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        assets.pickle_model, max_seq_length=64, allow_pickle=True, use_gradient_checkpointing=False
    )
    torch.testing.assert_close(_logits(model), _logits(loaded_model[0]), atol=0, rtol=0)


def test_safetensors_are_preferred_over_pickle_even_with_allow_pickle(assets, tmp_path):
    import torch

    from swiftune_loader import FastLanguageModel

    folder = shutil.copytree(assets.model, tmp_path / "both")
    torch.save({"not": torch.zeros(1)}, folder / "pytorch_model.bin")  # would break the model if it were read
    FastLanguageModel.from_pretrained(folder, max_seq_length=64, allow_pickle=True, use_gradient_checkpointing=False)


def test_auto_map_of_a_known_model_type_loads_without_remote_code(assets, tmp_path):
    from swiftune_loader import FastLanguageModel

    folder = shutil.copytree(assets.model, tmp_path / "llama-with-auto-map")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=64, use_gradient_checkpointing=False)
    assert type(model).__module__.startswith("transformers.models.llama")


def test_remote_code_refusal_runs_none_of_the_folders_code(assets):
    from swiftune_loader.model_path import check_weight_safety

    # configuration_quillnet.py in the folder exits the interpreter if it is ever imported.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        check_weight_safety(assets.remote_code_model)
    check_weight_safety(assets.remote_code_model, trust_remote_code=True)  # asked for: no refusal
