"""save_merged: the three methods from an adapter over the hand-written Llama, and the refusals."""

import json

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from swiftune_export import save_merged


@pytest.fixture
def llama_adapter(tmp_path, llama_dir):
    folder = tmp_path / "adapter"
    folder.mkdir()
    torch.manual_seed(1)
    tensors = {}
    for i in range(2):
        module = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{module}.lora_A.weight"] = torch.randn(4, 256) * 0.1
        tensors[f"{module}.lora_B.weight"] = torch.randn(256, 4) * 0.1
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": str(llama_dir)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_lora_is_a_plain_adapter_folder(tmp_path, llama_adapter, llama_dir):
    out = save_merged(llama_adapter, tokenizer=llama_dir, out=tmp_path / "lora", method="lora")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ]
    )
    assert (
        load_file(str(out / "adapter_model.safetensors")).keys()
        == load_file(str(llama_adapter / "adapter_model.safetensors")).keys()
    )


def test_merged_16bit(tmp_path, llama_adapter):
    out = save_merged(llama_adapter, out=tmp_path / "merged", method="merged_16bit")
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(
        str(json.loads((llama_adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
        + "/model.safetensors"
    )
    adapter = load_file(str(llama_adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = 2.0 * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    want = (base["model.layers.0.self_attn.q_proj.weight"].float() + delta).to(torch.bfloat16)
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], want)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_gguf_with_two_quantizations_and_modelfile(tmp_path, llama_adapter):
    out = save_merged(llama_adapter, out=tmp_path / "gguf", method="gguf", quantization=["q4_k", "f16"])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "Modelfile",
            "model-q4_k.gguf",
            "model-f16.gguf",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ]
    )
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out / "model-q4_k.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_K
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q4_k.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_refusals(tmp_path, llama_adapter, llama_dir):
    with pytest.raises(ValueError, match="choose one of"):
        save_merged(llama_adapter, out=tmp_path / "x", method="merged_8bit")
    with pytest.raises(ValueError, match="choose one of"):
        save_merged(llama_adapter, out=tmp_path / "x", method="gguf", quantization=["q3_k_xl"])
    with pytest.raises(ValueError, match="peft adapter folder|not a LoRA adapter"):
        save_merged(llama_dir, out=tmp_path / "x", method="lora")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_merged(tmp_path / "nowhere", out=tmp_path / "x")
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(dict(config, quantization_config={"load_in_8bit": True})))
    with pytest.raises(ValueError, match="stored quantized \(8 bits\)"):
        save_merged(llama_adapter, out=tmp_path / "x", method="merged_16bit")
    (llama_dir / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "gptq"})))
    with pytest.raises(ValueError, match="stored quantized \(gptq\)"):
        save_merged(llama_adapter, out=tmp_path / "x", method="gguf")
    assert not (tmp_path / "x").exists()


def test_existing_output_is_kept_without_overwrite(tmp_path, llama_adapter):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_merged(llama_adapter, out=out, method="merged_16bit")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save_merged(llama_adapter, out=out, method="merged_16bit", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_gguf_from_a_full_model_folder(tmp_path, llama_dir):
    out = save_merged(llama_dir, out=tmp_path / "g", method="gguf", quantization="q8_0", ollama=False)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".gguf") == ["model-q8_0.gguf"]
    assert not (out / "Modelfile").exists()
