"""Loading options proven on tiny local folders: 8-bit, full fine-tuning, dtype auto, the tokenizer fix, and one
clear error for each option that cannot work."""

import logging
from types import SimpleNamespace

import pytest
import torch

import swiftune_loader.loading_options as loading_options
from swiftune_loader import FastLanguageModel
from swiftune_loader.precision import resolve_dtype

IDS = torch.tensor([[1, 7, 42, 9, 13, 2, 30]])


def _lora_grads(model):
    model.zero_grad()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_load_in_8bit_quantizes_and_trains_lora(tiny_model_dir):
    import bitsandbytes as bnb

    logits, grads = {}, {}
    for fast_path in (False, True):
        model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, load_in_8bit=True, fast_path=fast_path)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, bnb.nn.Linear8bitLt) and q_proj.weight.dtype == torch.int8
        model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights=False, use_gradient_checkpointing=False)
        logits[fast_path], grads[fast_path] = _lora_grads(model)
    assert grads[False] and all(g is not None and g.abs().sum() > 0 for g in grads[False].values())
    # The fast path leaves int8 projections to bitsandbytes and computes the same model.
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=1e-4)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_full_finetuning_trains_every_weight_without_adapters(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, full_finetuning=True, use_gradient_checkpointing=True)
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())
    assert model.is_activation_checkpointing  # checkpointing is set up here: no get_peft_model will do it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    # Every tensor moved (the embedding only in the rows of the tokens seen).
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    with pytest.raises(ValueError, match="full_finetuning=True"):
        FastLanguageModel.get_peft_model(model, r=4)


@pytest.mark.parametrize(
    "dtype, expected",
    [("float16", torch.float32), ("bfloat16", torch.bfloat16), ("float32", torch.float32)],
)
def test_full_finetuning_dtype_rules(tiny_model_dir, caplog, dtype, expected):
    with caplog.at_level(logging.WARNING):
        model, _ = FastLanguageModel.from_pretrained(
            tiny_model_dir, full_finetuning=True, dtype=dtype, use_gradient_checkpointing=False
        )
    assert {p.dtype for p in model.parameters()} == {expected}
    assert ("weights are kept in float32" in caplog.text) == (dtype == "float16")


def test_adapters_keep_float16_weights(tiny_model_dir):
    # The float16 rule is about weights the optimizer updates; frozen base weights stay as asked.
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, dtype="float16")
    assert model.dtype == torch.float16


def test_dtype_auto_picks_by_hardware(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto") == resolve_dtype(None) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, dtype="auto")
    assert model.dtype == torch.float32


def test_bitsandbytes_runs_here():
    # The check the loader relies on answers for real on this machine (bitsandbytes runs on the CPU).
    assert loading_options.bitsandbytes_problem("cpu") is None


@pytest.mark.parametrize("option", ["load_in_4bit", "load_in_8bit"])
def test_quantized_loading_without_a_working_bitsandbytes_is_a_clear_error(monkeypatch, tiny_model_dir, option):
    monkeypatch.setattr(loading_options, "bitsandbytes_problem", lambda device: f"it has no backend for {device}")
    with pytest.raises(RuntimeError, match=r"needs bitsandbytes, and it has no backend for cpu.*load_in_4bit=False"):
        FastLanguageModel.from_pretrained(tiny_model_dir, **{option: True})


@pytest.mark.parametrize("value", ["yes", "unsloth", 0, -1.5, None])
def test_invalid_gradient_checkpointing_is_refused(tiny_model_dir, value):
    with pytest.raises(ValueError, match="use_gradient_checkpointing must be True, False, 'offload', 'auto' or a GiB"):
        FastLanguageModel.from_pretrained(tiny_model_dir, use_gradient_checkpointing=value)


def test_invalid_gradient_checkpointing_is_refused_by_get_peft_model(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="use_gradient_checkpointing must be"):
        FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="always")
    assert not hasattr(model, "peft_config")  # refused before anything changed


def test_fix_tokenizer_true_without_a_fixer_says_where_to_get_one(tiny_model_dir):
    with pytest.raises(ValueError, match=r"swiftune\.FastLanguageModel.*or pass a callable"):
        FastLanguageModel.from_pretrained(tiny_model_dir, fix_tokenizer=True)


def test_fix_tokenizer_callable_is_applied_after_loading(tiny_model_dir):
    seen = {}

    def fixer(model, tokenizer):
        seen["model_type"], seen["max_length"] = model.config.model_type, tokenizer.model_max_length
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|fixed|>"]})
        return tokenizer

    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model_dir, max_seq_length=96, fix_tokenizer=fixer)
    assert seen == {"model_type": "llama", "max_length": 96}
    assert "<|fixed|>" in tokenizer.get_vocab() and model._swiftune_tokenizer is tokenizer


@pytest.mark.parametrize("fixer, error", [("yes", TypeError), (lambda model, tokenizer: None, ValueError)])
def test_bad_tokenizer_fixers_are_refused(tiny_model_dir, fixer, error):
    with pytest.raises(error, match="fix_tokenizer"):
        FastLanguageModel.from_pretrained(tiny_model_dir, fix_tokenizer=fixer)


@pytest.mark.parametrize(
    "stored, options, message",
    [
        ({"load_in_4bit": True}, {"full_finetuning": True}, "cannot be fully fine-tuned"),
        ({"load_in_4bit": True}, {"load_in_8bit": True}, "load_in_8bit cannot re-quantize"),
        ({"_load_in_8bit": True}, {"load_in_4bit": True}, "load_in_4bit cannot re-quantize"),
    ],
)
def test_prequantized_checkpoints_refuse_what_they_cannot_do(stored, options, message):
    config = SimpleNamespace(quantization_config={"quant_method": "bitsandbytes", **stored})
    kind = loading_options.stored_quantization(config)
    flags = {"load_in_4bit": False, "load_in_8bit": False, "full_finetuning": False, **options}
    with pytest.raises(ValueError, match=message):
        loading_options.check_stored_quantization(kind, **flags)
    loading_options.check_stored_quantization(kind, False, False, False)  # loading it as it is works


@pytest.mark.parametrize(
    "targets, missing",
    [(["q_proj", "qkv_proj"], "qkv_proj"), (["attention"], "attention"), (r".*\.wq", r".*\.wq")],
)
def test_target_modules_that_match_nothing_list_the_linear_layers(tiny_model_dir, targets, missing):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="match no module") as error:
        FastLanguageModel.get_peft_model(model, r=4, target_modules=targets)
    message = str(error.value)
    assert repr(missing) in message
    assert "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in message
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], r".*layers\.0\.self_attn\.q_proj", None])
def test_valid_target_modules_are_accepted(tiny_model_dir, targets):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=targets)
    assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("options", [{"lora_dropout": 0.1}, {"use_dora": True}])
def test_adapters_the_fused_kernels_cannot_run_fall_back_to_peft_with_a_log_line(tiny_model_dir, caplog, options):
    from swiftune_loader.patching.lora_parts import lora_parts

    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, fast_path=True)
    with caplog.at_level(logging.WARNING):
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, **options)
    assert "runs through peft's layers" in caplog.text
    assert lora_parts(model.get_base_model().model.layers[0].mlp.gate_proj) is None
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("world_size", [None, "1", "2"])
def test_nf4_storage_is_the_compute_dtype_only_under_torchrun(monkeypatch, world_size):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    config = loading_options.quantization_config(True, False, torch.bfloat16)
    expected = torch.bfloat16 if world_size == "2" else torch.uint8
    assert config.bnb_4bit_quant_storage == expected
