"""``swiftune export``: q4_k_m by default, a comma-separated list of GGUF types, merged_4bit, and 4-bit bases."""

import json

import gguf
import pytest
import torch

from swiftune_cli.main import main


@pytest.fixture(scope="module")
def nf4_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model stored as bitsandbytes NF4 (as a QLoRA base is), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantization, device_map="cpu")
    out = tmp_path_factory.mktemp("nf4")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights on the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("run") / "adapter"
    get_peft_model(model, config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _file_type(path) -> int:
    field = gguf.GGUFReader(path).fields["general.file_type"]
    return int(field.parts[field.data[0]][0])


def test_default_gguf_type_is_q4_k_m(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(tiny_model_dir), "--method", "gguf", "--no-modelfile", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.gguf")) == ["model-q4_k_m.gguf"]
    assert _file_type(out / "model-q4_k_m.gguf") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert "[1/1] writing GGUF q4_k_m" in capsys.readouterr().out


def test_comma_separated_quant_list_writes_one_file_each(tiny_model_dir, tmp_path):
    out = tmp_path / "gguf"
    argv = ["export", str(tiny_model_dir), "--method", "gguf", "--quant", "q4_k_m,q8_0", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("*.gguf")) == ["model-q4_k_m.gguf", "model-q8_0.gguf"]
    assert _file_type(out / "model-q4_k_m.gguf") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert _file_type(out / "model-q8_0.gguf") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q4_k_m.gguf\n")  # the first type listed


def test_a_4bit_model_folder_is_dequantized_for_gguf(nf4_model_dir, tmp_path, capsys):
    out = tmp_path / "gguf"
    argv = ["export", str(nf4_model_dir), "--method", "gguf", "--quant", "f32", "--no-modelfile", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "[1/2] dequantizing the 4-bit weights" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model-f32.gguf"], "the dequantized scratch copy was left"
    # The F32 GGUF holds exactly the weights transformers computes with from the NF4 checkpoint.
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    nf4 = AutoModelForCausalLM.from_pretrained(nf4_model_dir, device_map="cpu")
    weight = nf4.model.layers[0].mlp.down_proj.weight
    expected = dequantize_4bit(weight.data, weight.quant_state).float()
    tensors = {t.name: t for t in gguf.GGUFReader(out / "model-f32.gguf").tensors}
    stored = torch.from_numpy(tensors["blk.0.ffn_down.weight"].data.copy()).reshape(expected.shape)
    torch.testing.assert_close(stored, expected)


def test_merged_4bit_writes_nf4_layers_transformers_loads(adapter_dir, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged4"
    assert main(["export", str(adapter_dir), "--method", "merged_4bit", "--out", str(out)]) == 0
    assert "[1/1] writing merged_4bit" in capsys.readouterr().out
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "bitsandbytes" and quantization["load_in_4bit"]
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"

    merged16 = tmp_path / "merged16"
    assert main(["export", str(adapter_dir), "--method", "merged_16bit", "--out", str(merged16)]) == 0
    from bitsandbytes.functional import dequantize_4bit

    layer = model.model.layers[0].self_attn.q_proj
    four_bit = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    name = "model.layers.0.self_attn.q_proj.weight"
    sixteen = AutoModelForCausalLM.from_pretrained(merged16).state_dict()[name]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()[name]
    # The 4-bit weight is the merged one up to NF4 rounding: nearer to it than the base without the adapter is.
    assert (four_bit - sixteen).norm() < (base - sixteen).norm() / 2
