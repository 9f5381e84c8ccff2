"""Chunked log-probabilities equal log_softmax of the full logits in float64, in values and LoRA gradients.

The repository's conftest turns Triton's interpreter on, so these run the Triton kernel itself on the CPU; one test
compares it, in small chunks, with the kernel's pure-torch path."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM
from trl.trainer.utils import add_fused_lm_head

from swiftune_train.logprobs import (
    chunked_lm_head_blocker,
    chunked_token_logprobs,
    install_chunked_lm_head,
    lm_head_logit_options,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 384


def _lora(model):
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.fixture
def llama(tiny_model_dir):
    return _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))


@pytest.fixture
def gemma2():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, initializer_range=0.2,
        final_logit_softcapping=2.0, attn_logit_softcapping=5.0, pad_token_id=0,
    )  # fmt: skip
    return _lora(Gemma2ForCausalLM(config))


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(5, VOCAB, (3, 12))
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0  # right padding (DPO, KTO)
    attention[2, :3] = 0  # left padding (GRPO prompts)
    completion = attention.clone()
    completion[:, :5] = 0  # the prompt is not scored
    return ids, attention, completion


def _reference(model, ids, attention, completion, temperature):
    """log_softmax of the full logits of a float64 copy, each row alone without its padding (at the positions it
    has in the padded batch); zero where the next token is not scored."""
    model64 = copy.deepcopy(model).double()
    logps = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.float64)
    for row in range(ids.shape[0]):
        real = attention[row].nonzero()[:, 0]
        start, end = int(real[0]), int(real[-1]) + 1
        positions = torch.arange(start, end)[None]
        logits = model64(input_ids=ids[row : row + 1, start:end], position_ids=positions, use_cache=False).logits
        row_logps = (logits[0, :-1] / temperature).log_softmax(-1).gather(-1, ids[row, start + 1 : end, None])
        logps[row, start : end - 1] = row_logps[:, 0]
    return torch.where(completion[:, 1:] == 1, logps, 0.0), model64


def _lora_grads(model):
    return {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("name", "temperature"), [("llama", 1.0), ("llama", 0.7), ("gemma2", 1.0)])
def test_values_and_lora_gradients_equal_full_logits_in_float64(name, temperature, request):
    model = request.getfixturevalue(name)
    ids, attention, completion = _batch()
    expected, model64 = _reference(model, ids, attention, completion, temperature)
    weights = torch.randn(expected.shape, dtype=torch.float64)  # any downstream use of the per-token values
    (expected * weights).sum().backward()

    lm_head_calls = []
    model.get_base_model().lm_head.register_forward_hook(lambda *a: lm_head_calls.append(1))
    got = chunked_token_logprobs(model, ids, attention, completion_mask=completion, temperature=temperature)
    (got * weights.float()).sum().backward()

    assert got.shape == (3, 11) and got.dtype == torch.float32 and lm_head_calls == []
    assert (got[completion[:, 1:] == 0] == 0).all()
    torch.testing.assert_close(got.double(), expected.detach(), atol=2e-5, rtol=1e-5)
    reference_grads, grads = _lora_grads(model64), _lora_grads(model)
    assert reference_grads.keys() == grads.keys() and len(grads) > 0
    for key in grads:
        torch.testing.assert_close(grads[key], reference_grads[key], atol=2e-5, rtol=1e-4, msg=key)


def test_gemma2_softcap_is_applied(gemma2):
    ids, attention, completion = _batch()
    capped = chunked_token_logprobs(gemma2, ids, attention, completion_mask=completion)
    gemma2.config.final_logit_softcapping = None
    uncapped = chunked_token_logprobs(gemma2, ids, attention, completion_mask=completion)
    assert (capped - uncapped).abs().max() > 1e-2  # the cap matters at this scale, so the test above tests it


def test_softcap_with_a_temperature_is_refused(gemma2):
    with pytest.raises(ValueError, match="soft-caps"):
        lm_head_logit_options(gemma2.config, temperature=0.7)
    assert "soft-caps" in chunked_lm_head_blocker(gemma2.get_base_model(), temperature=0.7)
    assert lm_head_logit_options(gemma2.config) == (None, 2.0)


def test_the_triton_kernel_in_chunks_matches_the_reference_path(llama, monkeypatch):
    ids, attention, completion = _batch()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernel's pure-torch CPU path
    reference = chunked_token_logprobs(llama, ids, attention, completion_mask=completion, temperature=0.7)
    reference.sum().backward()
    expected = _lora_grads(llama)
    llama.zero_grad()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton kernel in its interpreter, 4 tokens per chunk
    got = chunked_token_logprobs(llama, ids, attention, completion_mask=completion, temperature=0.7, chunk_size=4)
    got.sum().backward()
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    for key, grad in _lora_grads(llama).items():
        torch.testing.assert_close(grad, expected[key], atol=1e-5, rtol=1e-4, msg=key)


def test_installed_head_answers_trl_calls_like_trl_and_leaves_other_calls_alone(llama):
    ids, attention, completion = _batch()
    labels = ids.masked_fill(completion == 0, -100)
    base = llama.get_base_model()
    add_fused_lm_head(base, temperature=0.7)
    trl_out = llama(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    handle = install_chunked_lm_head(base, temperature=0.7)
    ours = llama(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    assert handle.calls == 1
    torch.testing.assert_close(ours.log_probs, trl_out.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, trl_out.loss, atol=1e-6, rtol=1e-6)
    assert torch.equal(ours.label_mask, trl_out.label_mask) and ours.entropy.isnan().all()

    plain = llama(input_ids=ids, attention_mask=attention)  # generation and plain forwards: the model's own
    assert plain.logits.shape == (3, 12, VOCAB) and handle.calls == 1
    handle.revert()
    llama(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    assert handle.calls == 1  # TRL's head again


def test_a_peft_wrapped_lm_head_is_refused_with_a_clear_error(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    ids, attention, _ = _batch()
    with pytest.raises(ValueError, match="plain nn.Linear lm_head"):
        chunked_token_logprobs(model, ids, attention)
    assert "lm_head" in chunked_lm_head_blocker(model.get_base_model())
