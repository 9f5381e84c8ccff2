"""save_merged end to end with a real peft adapter: the GGUF of the merged model gives peft's merged logits, and the
"lora" folder loads in plain peft."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from swiftune_export import save_merged
from swiftune_tokenizers_fix.testing import build_chat_tokenizer, build_tiny_llama


def _adapter(tmp_path):
    tokenizer = build_chat_tokenizer()
    base = build_tiny_llama(tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    # Loaded from its folder, as training does, so that the adapter records where its base is.
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a trained-looking adapter: B is zero at init
    model.save_pretrained(tmp_path / "adapter")
    return tokenizer, model


def test_gguf_of_merged_adapter_matches_peft(tmp_path):
    tokenizer, peft_model = _adapter(tmp_path)
    out = save_merged(tmp_path / "adapter", tokenizer, tmp_path / "export", method="gguf", quantization=["f32"])
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f32.gguf", dtype=torch.float32).eval()
    ids = tokenizer("What is the capital of France?", return_tensors="pt").input_ids
    with torch.no_grad():
        want = peft_model.eval()(ids).logits
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (out / "Modelfile").read_text().startswith("FROM ./model-f32.gguf")
    read = AutoTokenizer.from_pretrained(out, gguf_file="model-f32.gguf")
    assert read("<|im_start|>user\nhi<|im_end|>").input_ids == tokenizer("<|im_start|>user\nhi<|im_end|>").input_ids


def test_lora_folder_loads_in_plain_peft(tmp_path):
    tokenizer, peft_model = _adapter(tmp_path)
    out = save_merged(tmp_path / "adapter", tokenizer, tmp_path / "lora", method="lora")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    reloaded = PeftModel.from_pretrained(base, out).eval()
    ids = tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, peft_model.eval()(ids).logits)
