"""swiftune.FastLanguageModel: the loader's, plus tokenizer repair and the export methods users expect."""

import json

import torch
from transformers import AutoModelForCausalLM

import swiftune
from swiftune_loader import FastLanguageModel as LoaderFastLanguageModel
from swiftune_loader.testing import build_tiny_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer


def test_tokenizer_is_repaired_only_through_the_meta_package(tmp_path):
    # A planted defect: EOS doubles as the pad token, so padding masks would hide every end of turn.
    tokenizer = build_chat_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tiny_model_dir = build_tiny_model(tmp_path / "pad-is-eos", tokenizer)
    _, plain = LoaderFastLanguageModel.from_pretrained(str(tiny_model_dir), max_seq_length=64)
    _, repaired = swiftune.FastLanguageModel.from_pretrained(str(tiny_model_dir), max_seq_length=64)
    assert plain.pad_token_id == plain.eos_token_id
    assert repaired.pad_token_id != repaired.eos_token_id
    _, untouched = swiftune.FastLanguageModel.from_pretrained(
        str(tiny_model_dir), max_seq_length=64, fix_tokenizer=False
    )
    assert untouched.pad_token_id == untouched.eos_token_id


def test_model_carries_save_pretrained_merged_and_gguf(tiny_model_dir, tmp_path):
    model, tokenizer = swiftune.FastLanguageModel.from_pretrained(str(tiny_model_dir), max_seq_length=64)
    model = swiftune.FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    with torch.no_grad():  # a non-zero adapter, so that merging changes the weights
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 1000))
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    merged_dir = model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)

    files = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method=["f16", "q8_0"])
    names = sorted(p.name for p in files)
    assert len(names) == 2 and all(n.endswith(".gguf") for n in names), names
    assert all(p.stat().st_size > 0 for p in files)

    lora_dir = model.save_pretrained_merged(tmp_path / "lora", tokenizer, save_method="lora")
    assert json.loads((lora_dir / "adapter_config.json").read_text())["r"] == 4
