"""for_inference / for_training: batched greedy generation equals plain transformers' in every state, and the
training setup comes back as it was."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swiftune_loader import FastLanguageModel
from swiftune_loader.checkpointing import transformers_checkpointing
from swiftune_loader.testing import build_tiny_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

# Prompts of different lengths, so that batching pads the shorter ones.
PROMPTS = ["hello", "The quick brown fox jumps over the lazy"]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with weights large enough (init std 0.3, not 0.02) that attention, and so the positions and the
    padding, decide the greedy tokens."""
    return build_tiny_model(tmp_path_factory.mktemp("sharp-llama"), build_chat_tokenizer(), initializer_range=0.3)


def test_generation_here_depends_on_the_padding_side(model_dir):
    # What makes the comparisons below worth something: right padding would generate other tokens.
    left, right = (
        AutoTokenizer.from_pretrained(model_dir, padding_side="left"),
        AutoTokenizer.from_pretrained(model_dir),
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert not torch.equal(_generate(model, left)[1], _generate(model, right)[1])


def _generate(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return batch, out[:, batch["input_ids"].shape[1] :]


def _reference(model_dir, lora_state=None):
    """What plain transformers (+ plain peft, with the same adapter weights) generates, left-padded."""
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora_state is not None:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(_TARGETS)))
        model.load_state_dict(lora_state)
    model.eval()
    return _generate(model, tokenizer)


_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _training_state(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    offload = "forward" in base.model.layers[0].__dict__
    return {
        "training": model.training,
        "checkpointing": "offload" if offload else transformers_checkpointing(base),
        "use_cache": base.config.use_cache,
    }


@pytest.mark.parametrize(
    "fast_path, lora, checkpointing",
    [(False, False, None), (True, False, None), (False, True, True), (True, True, "offload")],
)
def test_batched_greedy_generation_matches_transformers_in_every_state(model_dir, fast_path, lora, checkpointing):
    # max_seq_length within the model's 256 positions: no RoPE scaling, the same model as the reference.
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=256, fast_path=fast_path)
    assert tokenizer.padding_side == "right"
    lora_state = None
    if lora:
        model = FastLanguageModel.get_peft_model(
            model, r=4, lora_alpha=8, init_lora_weights=False, use_gradient_checkpointing=checkpointing
        )
        lora_state = model.state_dict()  # random A and B: the adapters change what is generated
    training = {**_training_state(model), "training": True, "use_cache": False}
    assert training["checkpointing"] == (checkpointing or False)
    ref_batch, expected = _reference(model_dir, lora_state)
    assert (ref_batch["attention_mask"][:, 0] == 0).any()  # the batch really is padded, on the left

    for _ in range(2):  # inference, back to training, inference again
        FastLanguageModel.for_inference(model)
        assert tokenizer.padding_side == "left" and not model.training
        assert _training_state(model)["checkpointing"] is False and model.config.use_cache
        batch, generated = _generate(model, tokenizer)
        torch.testing.assert_close(batch["input_ids"], ref_batch["input_ids"])
        assert torch.equal(generated, expected), (generated, expected)

        FastLanguageModel.for_training(model)
        assert tokenizer.padding_side == "right"
        assert _training_state(model) == training
        if lora:  # training works in the restored state (checkpointing included)
            ids = torch.tensor([[1, 7, 42, 9, 13]])
            model(input_ids=ids, labels=ids).loss.backward()
            assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
            model.zero_grad()


def test_for_inference_twice_keeps_the_training_setup(tiny_model_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_model_dir)
    model = FastLanguageModel.get_peft_model(model, r=2, use_gradient_checkpointing="offload")
    FastLanguageModel.for_inference(model)
    FastLanguageModel.for_inference(model)
    FastLanguageModel.for_training(model)
    assert _training_state(model)["checkpointing"] == "offload" and tokenizer.padding_side == "right"


def test_a_tokenizer_passed_explicitly_is_switched_and_restored(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    model._swiftune_tokenizer = None  # as for a model that did not come from from_pretrained
    FastLanguageModel.for_inference(model, other)
    assert other.padding_side == "left"
    FastLanguageModel.for_training(model)
    assert other.padding_side == "right"


def test_generation_runs_transformers_modules_and_training_gets_the_kernels_back(tiny_model_dir):
    from swiftune_kernels.modules import RMSNorm

    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, fast_path=True)
    model = FastLanguageModel.get_peft_model(model, r=2, use_gradient_checkpointing=False)
    base = model.get_base_model()
    norm, mlp = base.model.norm, base.model.layers[0].mlp
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        patched_logits = model(input_ids=ids).logits
    assert isinstance(norm, RMSNorm) and "forward" in mlp.__dict__

    FastLanguageModel.for_inference(model)
    assert not isinstance(base.model.norm, RMSNorm) and "forward" not in mlp.__dict__  # decode: plain modules
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, patched_logits, atol=1e-5, rtol=1e-5)

    FastLanguageModel.for_training(model)
    assert isinstance(base.model.norm, RMSNorm) and "forward" in mlp.__dict__
    assert base.model.norm.weight is norm.weight  # the same parameters: an optimizer keeps its state
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, patched_logits, atol=0, rtol=0)
