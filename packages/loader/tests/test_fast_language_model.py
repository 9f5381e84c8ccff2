import pytest
import torch
from peft import PeftModel

from swiftune_loader import FastLanguageModel, chat_reply


def test_loads_model_and_tokenizer_with_max_seq_length(tiny_model_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model_dir, max_seq_length=128)
    assert model.dtype == torch.float32  # no GPU: float32 is the default on the CPU
    assert model.max_seq_length == 128 and tokenizer.model_max_length == 128
    assert tokenizer.chat_template


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_seq_length": 0}, "max_seq_length"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "not both"),
        ({"full_finetuning": True, "load_in_4bit": True}, "full_finetuning"),
        ({"dtype": "float64"}, "dtype must be"),
    ],
)
def test_bad_loading_options_are_refused(tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastLanguageModel.from_pretrained(tiny_model_dir, **kwargs)


def test_get_peft_model_adapts_every_projection(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    peft_model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    assert isinstance(peft_model, PeftModel)
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.parametrize("r", [0, -2, 1.5])
def test_bad_rank_is_refused(tiny_model_dir, r):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        FastLanguageModel.get_peft_model(model, r=r)


def test_adding_lora_twice_is_refused(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    peft_model = FastLanguageModel.get_peft_model(model, r=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        FastLanguageModel.get_peft_model(peft_model, r=2)


def test_inference_and_training_modes_switch_checkpointing_and_cache(tiny_model_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model_dir)
    model = FastLanguageModel.get_peft_model(model, r=2, use_gradient_checkpointing=True)
    base = model.get_base_model()
    assert base.is_activation_checkpointing and model.training
    FastLanguageModel.for_inference(model)
    assert not model.training and not base.is_activation_checkpointing and base.config.use_cache
    assert isinstance(chat_reply(model, tokenizer, "hello", max_new_tokens=3), str)
    FastLanguageModel.for_training(model)
    assert model.training and base.is_activation_checkpointing and not base.config.use_cache


def test_load_in_4bit_quantizes_linear_layers(tiny_model_dir):
    import bitsandbytes as bnb

    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, load_in_4bit=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"


def test_fast_path_on_request_patches_and_keeps_outputs(tiny_model_dir):
    plain, _ = FastLanguageModel.from_pretrained(tiny_model_dir, fast_path=False)
    fast, _ = FastLanguageModel.from_pretrained(tiny_model_dir, fast_path=True)
    assert plain._swiftune_patch is None and fast._swiftune_patch.counts["norms"] > 0
    ids = torch.tensor([[1, 7, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)


def test_fast_path_is_off_by_default_on_the_cpu(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    assert model._swiftune_patch is None


def test_unknown_architecture_warns_and_loads_plainly(tmp_path, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=384)).save_pretrained(tmp_path)
    from swiftune_tokenizers_fix.testing import build_chat_tokenizer

    build_chat_tokenizer().save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        model, _ = FastLanguageModel.from_pretrained(tmp_path, fast_path=True)
    assert model._swiftune_patch is None
    assert "No swiftune fast path for model_type='gpt2'" in caplog.text


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_offloaded_checkpointing_gives_the_gradients_of_no_checkpointing(tiny_model_dir, load_in_4bit):
    ids = torch.tensor([[1, 7, 42, 9, 13, 2]])
    grads = {}
    for mode in (False, "offload"):
        model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, load_in_4bit=load_in_4bit)
        torch.manual_seed(0)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode, init_lora_weights=False)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        layers = model.get_base_model().model.layers
        assert ("forward" in layers[0].__dict__) == (mode == "offload")
        assert not model.get_base_model().is_activation_checkpointing  # transformers' own checkpointing stays off
    assert grads[False].keys() == grads["offload"].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads["offload"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
