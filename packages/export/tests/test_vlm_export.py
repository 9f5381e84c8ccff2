"""Merged 16-bit export of vision-language LoRA adapters, from a saved adapter folder and from the model object.

transformers 5 renames these models' checkpoint keys on load (``language_model.model.*`` <-> ``model.language_model.*``)
while peft saves adapters with the loaded names: the merged folder must still hold every base weight, under the
base checkpoint's names, with the adapter merged in, and reload in plain transformers to the adapter model's logits.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from swiftune_export import merge_adapter, save_merged
from swiftune_loader.vision import FastVisionModel
from swiftune_loader.vision.testing import TINY_ARCHITECTURES, build_tiny_vision_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tokenizer = build_chat_tokenizer()
    return {a: build_tiny_vision_model(tmp_path_factory.mktemp(a), a, tokenizer) for a in TINY_ARCHITECTURES}


def _batch(processor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[[image]], return_tensors="pt"))


def _names(folder):
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def _reload(folder):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    # A weight the loader did not find would be initialised at random: every one must come from the export.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _adapter_model(folder):
    model, processor = FastVisionModel.from_pretrained(folder, use_gradient_checkpointing=False, fast_path=False)
    # Random B (not peft's zeros): every adapter, in the vision tower and the language model, changes the output.
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, random_state=1)
    return model.eval(), processor


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_merged_export_from_a_saved_adapter_and_from_the_model_reloads_to_the_adapter_logits(
    folders, architecture, tmp_path
):
    base_folder = folders[architecture]
    model, processor = _adapter_model(base_folder)
    batch = _batch(processor)
    with torch.no_grad():
        expected = model(**batch).logits
        untouched = _reload(base_folder)(**batch).logits
    assert (expected - untouched).abs().max() > 1e-2  # the adapter changes the model, so a lost merge shows
    model.save_pretrained(tmp_path / "adapter")
    saved = _names(tmp_path / "adapter")
    assert any(".language_model." in k for k in saved)  # peft's keys carry the loaded names
    assert any(".lora_A." in k and ("visual" in k or "vision" in k) for k in saved)  # and reach the vision tower

    exports = {
        "folder": save_merged(tmp_path / "adapter", processor, tmp_path / "from_folder", base_dir=base_folder),
        "merge_adapter": merge_adapter(tmp_path / "adapter", tmp_path / "merge_adapter", base_dir=base_folder),
        "object": save_merged(model, processor, tmp_path / "from_object"),
    }
    for how, folder in exports.items():
        # Written under the base checkpoint's names, as transformers' save_pretrained writes them.
        assert _names(folder) == _names(base_folder), how
        with torch.no_grad():
            torch.testing.assert_close(_reload(folder)(**batch).logits, expected, rtol=1e-4, atol=1e-4, msg=how)
    assert json.loads((exports["folder"] / "config.json").read_text())["model_type"] == architecture
    assert (exports["folder"] / "tokenizer_config.json").is_file()


def test_an_adapter_for_another_model_is_refused_with_the_modules_it_lacks(folders, tmp_path):
    model, _ = _adapter_model(folders["qwen2_vl"])
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="modules the base model lacks"):
        merge_adapter(tmp_path / "adapter", tmp_path / "out", base_dir=folders["llava"])
    assert not (tmp_path / "out").exists()  # nothing half-written
