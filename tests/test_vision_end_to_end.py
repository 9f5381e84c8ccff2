"""Vision-language fine-tuning end to end, for each architecture: FastVisionModel + LoRA by role, swiftune's
SFTTrainer (fused loss) fed by VisionDataCollator, the adapter saved and reloaded to the same outputs, and a merged
16-bit export through swiftune_export that plain transformers loads to the same logits."""

import datasets
import pytest
import torch
from PIL import Image

from swiftune_data.vision_collator import VisionDataCollator
from swiftune_export import save_merged
from swiftune_loader.vision import FastVisionModel, load_processor
from swiftune_loader.vision.testing import TINY_ARCHITECTURES, build_tiny_vision_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer
from swiftune_train import SFTTrainer, sft_config

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def tokenizer():
    return build_chat_tokenizer()


def color_rows():
    """One question per plain-colour image (sizes differ, so Qwen's image token counts differ too)."""
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]},
            ],
            "images": [Image.new("RGB", (28 + 14 * i, 28), rgb)],
        }
        for i, (name, rgb) in enumerate(COLORS.items())
    ]


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_train_save_reload_and_export_merged(architecture, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    folder = build_tiny_vision_model(tmp_path / "base", architecture, tokenizer)
    model, processor = FastVisionModel.from_pretrained(folder, use_gradient_checkpointing=False)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    collator = VisionDataCollator(processor)
    args = sft_config(
        str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=2e-2,
        warmup_steps=0,
        lr_scheduler_type="constant",
        max_length=None,
        gradient_checkpointing=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(color_rows()),
        processing_class=processor,
        data_collator=collator,
    )
    # The vision-language model trains through swiftune's fused loss, which equals transformers' own loss.
    assert trainer.fused_loss
    batch = collator(color_rows())
    fused = trainer.compute_loss(model, batch)
    torch.testing.assert_close(fused, model(**batch).loss, rtol=1e-5, atol=1e-5)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses  # every step sees both examples

    FastVisionModel.for_inference(model)
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    base, _ = FastVisionModel.from_pretrained(folder, use_gradient_checkpointing=False)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained, rtol=1e-5, atol=1e-5)

    merged = save_merged(model, processor, tmp_path / "merged", method="merged_16bit")
    plain = AutoModelForImageTextToText.from_pretrained(merged).eval()
    assert not any(".lora_" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, trained, rtol=1e-5, atol=1e-5)
    again = dict(
        load_processor(merged)(
            text=[processor.apply_chat_template(color_rows()[0]["messages"], tokenize=False)],
            images=[color_rows()[0]["images"]],
            return_tensors="pt",
        )
    )
    assert torch.equal(again["input_ids"][0], batch["input_ids"][0, : again["input_ids"].shape[1]])
