"""Tiny random vision-language models with their processors, saved to a folder, for tests that download nothing.

Each architecture is built from its transformers config with a hidden size of 32, two language layers, a two-block
vision tower and images of 28 to 56 pixels, so that a forward and backward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

TINY_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "mllama", "llava", "gemma3")

# What stands for one image in each family's chat template; the processor expands it.
_IMAGE_PLACEHOLDERS = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "mllama": "<|image|>",
    "llava": "<image>\n",
    "gemma3": "<start_of_image>",
}
_SPECIAL_TOKENS = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "mllama": ["<|image|>", "<|python_tag|>"],
    "llava": ["<image>"],
    "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
}
_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def vision_chat_template(image_placeholder: str) -> str:
    """A ChatML chat template whose message content may be a string or a list of {"type": "text"/"image"} parts."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image_placeholder + "{% elif part['type'] == 'text' %}{{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def build_tiny_vision_model(
    out_dir: str | os.PathLike, architecture: str, tokenizer, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Save a tiny random vision-language model of ``architecture`` and its processor to ``out_dir``.

    Args:
        out_dir: folder to write.
        architecture: one of :data:`TINY_ARCHITECTURES`.
        tokenizer: a fast tokenizer with ChatML markers and a pad token (e.g.
            ``swiftune_tokenizers_fix.testing.build_chat_tokenizer()``); a copy gets the family's image tokens.
        seed: initialisation seed.
        dtype: weight dtype stored in the folder.

    Returns:
        ``out_dir`` as a Path.
    """
    import torch

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose one of {TINY_ARCHITECTURES}.")
    tokenizer = copy.deepcopy(tokenizer)
    specials = _SPECIAL_TOKENS[architecture]
    tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    if architecture == "gemma3":
        # Gemma 3's processor reads its image markers from named tokenizer attributes.
        tokenizer._set_model_specific_special_tokens(
            {"boi_token": specials[0], "eoi_token": specials[1], "image_token": specials[2]}
        )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    text = dict(
        _TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    builder = {
        "qwen2_vl": _qwen2_vl,
        "qwen2_5_vl": _qwen2_5_vl,
        "mllama": _mllama,
        "llava": _llava,
        "gemma3": _gemma3,
    }[architecture]
    template = vision_chat_template(_IMAGE_PLACEHOLDERS[architecture])
    model_class, config, processor = builder(tokenizer, text, ids, template)
    torch.manual_seed(seed)
    model = model_class(config).to(getattr(torch, dtype))
    with torch.no_grad():
        # Parameters initialised to one value (norm scales, biases, Mllama's cross-attention gates, Gemma 3's image
        # projection) get random ones, as a trained checkpoint has: zero gates or a zero projection would keep the
        # images from reaching the text (no gradient for the vision tower), and unit norm scales hide norm bugs.
        for parameter in model.parameters():
            if parameter.is_floating_point() and bool((parameter == parameter.flatten()[0]).all()):
                parameter.add_(torch.randn_like(parameter) * 0.5)
        # With the usual 0.02-std init, a 32-wide output layer keeps every logit within about 0.5 of the others, so
        # no adapter could move the loss far below ln(vocab size); a trained one separates tokens sharply.
        model.get_output_embeddings().weight.mul_(10.0)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def _qwen_ids(ids: dict) -> dict:
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _qwen_processor(processor_class, tokenizer, template):
    from transformers import Qwen2VLImageProcessorPil

    from swiftune_loader.vision.processors import image_only_processor_class

    # 28x28 pixel patches after merging: a 56x56 image gives 4 image tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=84 * 84, patch_size=14, merge_size=2)
    return image_only_processor_class(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )


def _qwen_text(text: dict) -> dict:
    # M-RoPE splits each head's 4 rotary frequencies into (time, height, width) sections.
    return dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})


def _qwen2_vl(tokenizer, text, ids, template):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    config = Qwen2VLConfig(
        text_config=_qwen_text(text),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        **_qwen_ids(ids),
    )
    return Qwen2VLForConditionalGeneration, config, _qwen_processor(Qwen2VLProcessor, tokenizer, template)


def _qwen2_5_vl(tokenizer, text, ids, template):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    # Window attention over 56-pixel windows in block 0, full attention in block 1.
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)
    vision.update(fullatt_block_indexes=[1], window_size=56)
    config = Qwen2_5_VLConfig(text_config=_qwen_text(text), vision_config=vision, **_qwen_ids(ids))
    return Qwen2_5_VLForConditionalGeneration, config, _qwen_processor(Qwen2_5_VLProcessor, tokenizer, template)


def _mllama(tokenizer, text, ids, template):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        intermediate_layers_indices=[0],
        vision_output_dim=64,  # hidden_size * (1 + len(intermediate_layers_indices))
        image_size=28,
        patch_size=14,
        max_num_tiles=2,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    config = MllamaConfig(
        text_config=dict(text, cross_attention_layers=[1]), vision_config=vision, image_token_index=ids["<|image|>"]
    )
    image_processor = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    return MllamaForConditionalGeneration, config, processor


def _llava(tokenizer, text, ids, template):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaProcessor

    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    config = LlavaConfig(
        text_config=dict(text, model_type="llama"),
        vision_config=vision,
        image_token_index=ids["<image>"],
        image_seq_length=4,
        vision_feature_layer=-1,
    )
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    # CLIP adds a CLS position that the "default" feature selection drops: (28 / 14)^2 = 4 image tokens.
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    return LlavaForConditionalGeneration, config, processor


def _gemma3(tokenizer, text, ids, template):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=dict(text, head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
        vision_config=vision,
        mm_tokens_per_image=4,  # 4x4 patches pooled to 2x2
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template, image_seq_length=4
    )
    return Gemma3ForConditionalGeneration, config, processor
