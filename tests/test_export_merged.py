"""Merged exports from model objects and folders, on bf16 and NF4 (bitsandbytes 4-bit) bases, against the adapter
model they come from.

Tolerances, derived from the rounding of the stored dtype:

- merged_16bit stores W + s B A rounded once to bf16: each weight within half a bf16 step, 2**-9 relative, of the
  exact value (2**-8 allowed, for the float32 the sum is computed in). Through the 2 * layers + 2 matmuls of the
  residual stream and head, first order, the logits then move by at most 2**-9 * (2 * layers + 2) relative to
  the adapter model's; the test allows 4 times that, and checks that dropping the adapter would leave the bound.
- merged_4bit stores NF4(W + s B A): its error is NF4's, so it is compared with the adapter model evaluated with the
  same rounding, i.e. the float32 model whose merged weights went through bitsandbytes' NF4 and back: equal up to
  float32 arithmetic.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from swiftune_export import save_gguf, save_merged
from swiftune_loader.testing import build_tiny_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

LAYERS = 2
BF16_BOUND = 4 * 2**-9 * (2 * LAYERS + 2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 17, 40, 99, 5, 250, 31, 7]])


@pytest.fixture(scope="module")
def tokenizer():
    return build_chat_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A tiny Llama stored in bf16 (hidden 64, so that bitsandbytes' 64-value blocks fill rows)."""
    folder = tmp_path_factory.mktemp("base")
    return build_tiny_model(
        folder, tokenizer, dtype="bfloat16", hidden_size=64, intermediate_size=128, initializer_range=0.1
    )


def _with_adapter(base, seed=1):
    """LoRA on every projection, with B drawn at random as a trained adapter's would be (it is zero at init)."""
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def _relative(got, want):
    return ((got - want).norm() / want.norm()).item()


def _assert_same_tensors(folder, other):
    mine, theirs = load_file(str(folder / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def _nf4_config():
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def _nf4_base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=_nf4_config(), device_map="cpu").eval()


def _exact_merge(weight, model, module):
    """W + s B A in float64 from the peft model's own tensors (s = alpha / r = 2)."""
    layer = model.get_submodule(f"base_model.model.{module}")
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return weight.double() + 2.0 * b @ a


def _assert_bf16_merge(merged_dir, adapter_model, base_weights):
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    state = merged.state_dict()
    for module in (
        f"model.layers.{i}.{part}.{proj}"
        for i in range(LAYERS)
        for part, proj in [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")]
    ):
        exact = _exact_merge(base_weights[f"{module}.weight"], adapter_model, module)
        stored = state[f"{module}.weight"].double()
        assert ((stored - exact).abs() <= 2**-8 * exact.abs() + 1e-30).all(), module
    got, want = _logits(merged), _logits(adapter_model)
    with adapter_model.disable_adapter():
        without = _logits(adapter_model)
    print(f"merged vs adapter model: {_relative(got, want):.2e} (bound {BF16_BOUND:.2e})")
    assert _relative(got, want) < BF16_BOUND
    assert _relative(without, want) > 2 * BF16_BOUND  # the check would see an adapter that was not merged
    return merged


def test_merged_16bit_of_a_bf16_base_matches_the_adapter_model(tmp_path, tokenizer, base_dir):
    """The base in bf16 as users load it; the adapter model is then evaluated in float32, where its bf16 weights and
    float32 LoRA tensors are exact, so that the comparison sees only the merge's rounding."""
    adapter_model = _with_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16))
    base_weights = {
        k.replace(".base_layer", ""): v.clone() for k, v in adapter_model.get_base_model().state_dict().items()
    }
    out = save_merged(adapter_model, tokenizer, tmp_path / "merged", method="merged_16bit")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert {t.dtype for t in AutoModelForCausalLM.from_pretrained(out).state_dict().values()} == {torch.bfloat16}
    adapter_model.save_pretrained(tmp_path / "adapter")
    _assert_bf16_merge(out, adapter_model.float(), base_weights)
    # The same adapter saved as a folder merges to the same tensors.
    from_folder = save_merged(tmp_path / "adapter", tokenizer, tmp_path / "merged2", base_dir=base_dir)
    _assert_same_tensors(from_folder, out)


def test_merged_16bit_of_an_nf4_base_matches_the_qlora_model(tmp_path, tokenizer, base_dir):
    """The NF4 weights are dequantized (to the bf16 they were quantized from), merged in float32 and cast back."""
    import bitsandbytes.functional as bnb

    adapter_model = _with_adapter(_nf4_base(base_dir))
    dequantized = {}
    for name, module in adapter_model.get_base_model().named_modules():
        if type(module).__name__ == "Linear4bit":
            key = name.replace(".base_layer", "") + ".weight"
            dequantized[key] = bnb.dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert len(dequantized) == 7 * LAYERS
    out = save_merged(adapter_model, tokenizer, tmp_path / "merged", method="merged_16bit")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    _assert_bf16_merge(out, adapter_model, dequantized)
    # From folders: the NF4 base saved by transformers and the adapter saved by peft.
    _nf4_base(base_dir).save_pretrained(tmp_path / "nf4")
    adapter_model.save_pretrained(tmp_path / "adapter")
    from_folder = save_merged(tmp_path / "adapter", tokenizer, tmp_path / "merged2", base_dir=tmp_path / "nf4")
    _assert_same_tensors(from_folder, out)


@pytest.mark.parametrize("base_kind", ["bf16", "nf4"])
def test_merged_4bit_loads_in_transformers_as_the_nf4_rounded_adapter_model(tmp_path, tokenizer, base_dir, base_kind):
    import bitsandbytes.functional as bnb

    base = (
        _nf4_base(base_dir)
        if base_kind == "nf4"
        else AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    )
    adapter_model = _with_adapter(base)
    merged16 = save_merged(adapter_model, tokenizer, tmp_path / "merged16", method="merged_16bit")
    out = save_merged(adapter_model, tokenizer, tmp_path / "merged4", method="merged_4bit")
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["load_in_4bit"] and quantization["bnb_4bit_quant_type"] == "nf4"
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    assert {m.compute_dtype for m in loaded.modules() if type(m).__name__ == "Linear4bit"} == {torch.bfloat16}
    linear4 = {n for n, m in loaded.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(linear4) == 7 * LAYERS and "lm_head" not in linear4
    # The adapter model evaluated with the same rounding: the merged weights through NF4 and back, in float32.
    reference = AutoModelForCausalLM.from_pretrained(merged16, dtype=torch.float32).eval()
    with torch.no_grad():
        for name in linear4:
            weight = reference.get_submodule(name).weight
            codes, state = bnb.quantize_4bit(
                weight.data.to(torch.bfloat16), blocksize=64, quant_type="nf4", compress_statistics=True
            )
            weight.copy_(bnb.dequantize_4bit(codes, state).float())
            stored = loaded.get_submodule(name).weight
            torch.testing.assert_close(
                bnb.dequantize_4bit(stored.data, stored.quant_state).float(), weight, rtol=0, atol=0
            )
    # The 4-bit layers compute in bf16 (the checkpoint's compute dtype): against the reference in float32 the
    # logits move by bf16 rounding of the activations, bounded as for merged_16bit.
    error = _relative(_logits(loaded), _logits(reference))
    with adapter_model.disable_adapter():
        without = _logits(adapter_model.float() if base_kind == "bf16" else adapter_model)
    print(f"merged_4bit vs NF4-rounded adapter model: {error:.2e} (bound {BF16_BOUND:.2e})")
    assert error < BF16_BOUND
    assert _relative(without, _logits(reference)) > 2 * BF16_BOUND


def test_lora_from_a_peft_model_loads_in_plain_peft(tmp_path, tokenizer, base_dir):
    adapter_model = _with_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    out = save_merged(adapter_model, tokenizer, tmp_path / "lora", method="lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(adapter_model))
    with pytest.raises(ValueError, match="needs a peft model"):
        save_merged(base, tokenizer, tmp_path / "nope", method="lora")
    with pytest.raises(ValueError, match="pass tokenizer="):
        save_gguf(adapter_model, None, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_save_gguf_of_a_qlora_model_writes_every_quantization(tmp_path, tokenizer, base_dir):
    """A list of quantizations gives one file each (and a Modelfile); the F32 file is the merged model exactly."""
    adapter_model = _with_adapter(_nf4_base(base_dir))
    files = save_gguf(adapter_model, tokenizer, tmp_path / "gguf", quantization=["f32", "q8_0", "q4_k_m"])
    assert [p.name for p in files] == ["model-f32.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf"]
    assert all(p.is_file() for p in files) and (tmp_path / "gguf" / "Modelfile").is_file()
    merged = save_merged(adapter_model, tokenizer, tmp_path / "merged", method="merged_16bit")
    want = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval())
    loaded = AutoModelForCausalLM.from_pretrained(files[0].parent, gguf_file=files[0].name, dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded.eval()), want, rtol=0, atol=0)
