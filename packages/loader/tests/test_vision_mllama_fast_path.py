"""Llama 3.2 Vision (mllama): the self-attention layers of its language model take swiftune's fast attention, the
cross-attention layers keep transformers' code, and logits, loss, gradients and attention dropout stay those of
transformers (float32)."""

import numpy as np
import pytest
import torch
from PIL import Image

from swiftune_loader.patching.forwards import attention_forward
from swiftune_loader.vision import FastVisionModel
from swiftune_loader.vision.testing import build_tiny_vision_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_vision_model(tmp_path_factory.mktemp("mllama"), "mllama", build_chat_tokenizer())


def _load(folder, fast_path):
    return FastVisionModel.from_pretrained(folder, use_gradient_checkpointing=False, fast_path=fast_path)


def _batch(processor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[[image]], return_tensors="pt"))


def test_self_attention_layers_take_the_fast_path_and_cross_attention_layers_do_not(folder):
    model, _ = _load(folder, fast_path=True)
    cross_layers = set(model.config.text_config.cross_attention_layers)
    layers = model.model.language_model.layers
    assert cross_layers and len(layers) > len(cross_layers)  # the tiny model has both kinds
    for index, layer in enumerate(layers):
        attention = layer.cross_attn if index in cross_layers else layer.self_attn
        bound = getattr(attention.forward, "__func__", None) is attention_forward
        assert bound == (index not in cross_layers), (index, type(attention).__name__)
        assert type(attention).__name__ == (
            "MllamaTextCrossAttention" if index in cross_layers else "MllamaTextSelfAttention"
        )
    assert model._swiftune_patch.counts["forwards"] == len(layers) - len(cross_layers) + len(layers)  # + every MLP


def test_logits_loss_and_adapter_gradients_equal_transformers(folder):
    results = []
    for fast_path in (False, True):
        model, processor = _load(folder, fast_path)
        model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, random_state=1)
        batch = _batch(processor)
        output = model(**batch, labels=batch["input_ids"])
        output.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((output.logits.detach(), output.loss.detach(), grads))
    (plain_logits, plain_loss, plain_grads), (fast_logits, fast_loss, fast_grads) = results
    torch.testing.assert_close(fast_logits, plain_logits, **TOLERANCE)
    torch.testing.assert_close(fast_loss, plain_loss, **TOLERANCE)
    assert fast_grads.keys() == plain_grads.keys()
    self_attention = [n for n in plain_grads if ".self_attn.q_proj.lora_A" in n]
    assert self_attention  # the fast attention's own projections are among the compared gradients
    for name, grad in plain_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        scale = float(grad.abs().max())
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_attention_dropout_is_applied_in_training_as_transformers_does(folder):
    logits = {}
    for fast_path in (False, True):
        model, processor = _load(folder, fast_path)
        batch = _batch(processor)
        for module in model.modules():
            if type(module).__name__ == "MllamaTextSelfAttention":
                module.dropout = 0.5  # mllama names it ``dropout`` (the Llama modules ``attention_dropout``)
        model.eval()
        with torch.no_grad():
            without = model(**batch).logits
        model.train()
        torch.manual_seed(3)  # the same dropout masks in both runs: nothing else draws random numbers
        with torch.no_grad():
            logits[fast_path] = model(**batch).logits
        assert not torch.allclose(logits[fast_path], without, atol=1e-3)  # dropout did act
    torch.testing.assert_close(logits[True], logits[False], **TOLERANCE)
