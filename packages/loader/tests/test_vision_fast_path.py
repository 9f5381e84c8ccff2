"""The loader's text fast path inside vision-language models changes nothing: same logits and gradients (float32)
as transformers, with and without LoRA, for every architecture; only the language model is touched."""

import numpy as np
import pytest
import torch
from PIL import Image

from swiftune_loader.vision import FastVisionModel
from swiftune_loader.vision.testing import TINY_ARCHITECTURES, build_tiny_vision_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

# Float32 on the CPU: the kernels' references compute the same math in another order (seen: about 1e-7).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tokenizer = build_chat_tokenizer()
    return {a: build_tiny_vision_model(tmp_path_factory.mktemp(a), a, tokenizer) for a in TINY_ARCHITECTURES}


def _batch(processor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((40, 30), (56, 56))]
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]}],
    ]
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    batch = processor(text=texts, images=[[images[0]], [images[1]]], padding=True, return_tensors="pt")
    return dict(batch)


def _load(folder, fast_path):
    return FastVisionModel.from_pretrained(folder, use_gradient_checkpointing=False, fast_path=fast_path)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_fast_path_patches_only_the_language_model_and_keeps_the_logits(folders, architecture):
    plain, processor = _load(folders[architecture], fast_path=False)
    fast, _ = _load(folders[architecture], fast_path=True)
    handle = fast._swiftune_patch
    assert handle is not None and handle.counts["norms"] > 0 and handle.counts["forwards"] > 0
    language = set(map(id, fast.model.language_model.modules()))
    assert all(id(module) in language for module in handle.bound)
    assert all(id(parent) in language for parent, _, _ in handle.swapped)
    batch = _batch(processor)
    with torch.no_grad():
        expected = plain(**batch).logits
        torch.testing.assert_close(fast(**batch).logits, expected, **TOLERANCE)
        handle.revert()
        assert not any("forward" in module.__dict__ for module in fast.modules())
        torch.testing.assert_close(fast(**batch).logits, expected, **TOLERANCE)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_fast_path_with_lora_keeps_the_loss_and_every_adapter_gradient(folders, architecture):
    results = []
    for fast_path in (False, True):
        model, processor = _load(folders[architecture], fast_path)
        # Random B (not peft's zeros) so that every adapter changes the output and gets a gradient.
        model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, random_state=1)
        batch = _batch(processor)
        output = model(**batch, labels=batch["input_ids"])
        output.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((output.logits.detach(), output.loss.detach(), grads))
    (plain_logits, plain_loss, plain_grads), (fast_logits, fast_loss, fast_grads) = results
    torch.testing.assert_close(fast_logits, plain_logits, **TOLERANCE)
    torch.testing.assert_close(fast_loss, plain_loss, **TOLERANCE)
    assert fast_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        # The kernels sum in another order: differences reach 1e-5 of the tensor's largest entry (seen), not more.
        scale = float(grad.abs().max())
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_a_language_model_without_a_fast_path_loads_with_a_warning(folders, caplog, monkeypatch):
    monkeypatch.setattr("swiftune_loader.vision.fast_path.text_spec_for", lambda model_type: None)
    with caplog.at_level("WARNING"):
        model, _ = _load(folders["llava"], fast_path=True)
    assert model._swiftune_patch is None
    assert "No swiftune fast path for the language model of llava" in caplog.text
