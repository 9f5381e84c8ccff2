"""FastVisionModel.from_pretrained's loading options, checkpointing modes, inference/training switches, and
adapters that train, save and reload to the same outputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from swiftune_loader.checkpointing import transformers_checkpointing
from swiftune_loader.vision import FastVisionModel, load_processor
from swiftune_loader.vision.testing import build_tiny_vision_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tokenizer = build_chat_tokenizer()
    return {a: build_tiny_vision_model(tmp_path_factory.mktemp(a), a, tokenizer) for a in ("qwen2_5_vl", "llava")}


def _batch(processor, answer="A red square."):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False)
    batch = dict(processor(text=[text], images=[[image]], return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[batch["input_ids"] == processor.image_token_id] = -100  # image tokens are inputs, not text to predict
    return batch | {"labels": labels}


def test_loads_model_and_processor_with_dtype_and_max_seq_length(folders):
    model, processor = FastVisionModel.from_pretrained(folders["llava"], dtype=torch.bfloat16, max_seq_length=321)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.dtype == torch.bfloat16
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.max_seq_length == 321 and processor.tokenizer.model_max_length == 321


def test_full_finetuning_trains_every_weight(folders):
    model, _ = FastVisionModel.from_pretrained(folders["llava"], full_finetuning=True)
    assert all(p.requires_grad for p in model.parameters())


def test_4bit_quantizes_vision_and_language_layers_and_keeps_projector_and_lm_head(folders):
    import bitsandbytes as bnb

    model, processor = FastVisionModel.from_pretrained(folders["qwen2_5_vl"], load_in_4bit=True)
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds["model.visual.blocks.0.attn.qkv"] is bnb.nn.Linear4bit
    assert kinds["model.language_model.layers.0.mlp.down_proj"] is bnb.nn.Linear4bit
    assert kinds["model.visual.merger.mlp.0"] is torch.nn.Linear and kinds["lm_head"] is torch.nn.Linear
    peft_model = FastVisionModel.get_peft_model(model, r=4)
    loss = peft_model(**_batch(processor)).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(load_in_4bit=True, load_in_8bit=True), "one of load_in_4bit and load_in_8bit"),
        (dict(full_finetuning=True, load_in_4bit=True), "full_finetuning"),
        (dict(use_gradient_checkpointing="sometimes"), "use_gradient_checkpointing"),
        (dict(max_seq_length=0), "max_seq_length"),
    ],
)
def test_contradictory_options_fail_before_loading(folders, options, message):
    with pytest.raises(ValueError, match=message):
        FastVisionModel.from_pretrained(folders["llava"], **options)


def test_text_only_model_is_sent_to_fast_language_model(tiny_model_dir):
    with pytest.raises(ValueError, match="text-only model .*FastLanguageModel"):
        FastVisionModel.from_pretrained(tiny_model_dir)


def test_missing_model_name_or_folder_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="vision-language model"):
        FastVisionModel.from_pretrained(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FastVisionModel.from_pretrained(tmp_path / "nowhere")


def test_a_folder_without_processor_files_says_which_files_to_copy(folders, tmp_path):
    import shutil

    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        shutil.copy2(folders["llava"] / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="holds no image processor"):
        FastVisionModel.from_pretrained(tmp_path)


def test_qwen_processor_without_torchvision_works_on_images_and_refuses_videos(folders, caplog):
    from transformers import Qwen2_5_VLProcessor

    processor = load_processor(folders["qwen2_5_vl"])
    assert isinstance(processor, Qwen2_5_VLProcessor) and not hasattr(processor, "video_processor")
    assert "video_processor" not in type(processor).get_attributes()
    assert _batch(processor)["pixel_values"].shape[0] > 0
    with pytest.raises(ValueError, match="cannot process videos"):
        processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[np.zeros((2, 28, 28, 3), np.uint8)])


def test_gradient_checkpointing_is_paused_for_inference_and_restored_for_training(folders):
    model, processor = FastVisionModel.from_pretrained(folders["qwen2_5_vl"], use_gradient_checkpointing=True)
    model = FastVisionModel.get_peft_model(model, r=4)
    base = model.get_base_model()
    assert transformers_checkpointing(base) and model.training and processor.tokenizer.padding_side == "right"
    FastVisionModel.for_inference(model)
    assert not transformers_checkpointing(base) and not model.training
    assert base.config.use_cache and base.config.get_text_config().use_cache
    assert processor.tokenizer.padding_side == "left"  # batched prompts end where generation starts
    FastVisionModel.for_inference(model)  # twice: the training setup recorded first is kept
    FastVisionModel.for_training(model)
    assert transformers_checkpointing(base) and model.training and not base.config.get_text_config().use_cache
    assert processor.tokenizer.padding_side == "right"
    model(**_batch(processor)).loss.backward()


def test_offload_checkpointing_wraps_the_language_layers_and_keeps_gradients(folders):
    model, processor = FastVisionModel.from_pretrained(folders["llava"], use_gradient_checkpointing=False)
    plain = FastVisionModel.get_peft_model(model, r=4, init_lora_weights=False)
    plain(**_batch(processor)).loss.backward()
    model, _ = FastVisionModel.from_pretrained(folders["llava"], use_gradient_checkpointing="offload")
    offloaded = FastVisionModel.get_peft_model(model, r=4, init_lora_weights=False)
    base = offloaded.get_base_model()
    assert all("forward" in layer.__dict__ for layer in base.model.language_model.layers)
    assert transformers_checkpointing(base.model.vision_tower)
    offloaded(**_batch(processor)).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    FastVisionModel.for_inference(offloaded)
    assert not any("forward" in layer.__dict__ for layer in base.model.language_model.layers)
    FastVisionModel.for_training(offloaded)
    assert all("forward" in layer.__dict__ for layer in base.model.language_model.layers)


def test_trained_adapter_saves_and_reloads_to_the_same_outputs(folders, tmp_path):
    from peft import PeftModel

    model, processor = FastVisionModel.from_pretrained(folders["qwen2_5_vl"], use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
    batch = _batch(processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    FastVisionModel.for_inference(model)
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")

    base, _ = FastVisionModel.from_pretrained(folders["qwen2_5_vl"], use_gradient_checkpointing=False)
    with torch.no_grad():
        untouched = base(**batch).logits
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained, rtol=1e-5, atol=1e-5)
    assert (trained - untouched).abs().max() > 1e-2  # the adapter really changed the model
