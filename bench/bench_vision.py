"""LoRA training step on a random-init Qwen2.5-VL of real shape with synthetic images: transformers + peft vs
FastVisionModel (the language model's fast path, LoRA chosen by role, the fused linear cross-entropy loss).

Same model (bf16, sdpa attention), same LoRA (r=16 on the attention and MLP projections of the vision tower and the
language model, adapters in the model's dtype), same batch (conversations with one noise image each, collated once by
VisionDataCollator), gradient checkpointing (swiftune's offloaded variant with --swiftune-checkpointing offload),
AdamW. Reports tokens/s (text and image tokens), peak memory and the
first-step loss of each (they must agree). One process, nothing downloaded:

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python bench/bench_vision.py --shape 7b --batch 4
    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python bench/bench_vision.py --smoke      # tiny, on the CPU

Needs torch, transformers, peft (and triton on the GPU). The batch comes from swiftune's VisionDataCollator and
Qwen's image processor when pillow and datasets are importable; otherwise (or with --batch-source tensors) it is
built from tensors alone: the same token layout (the chat template with each image expanded to its image tokens)
and pixel patches of the same shape, which costs the model the same work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

SHAPES = {
    # Qwen/Qwen2.5-VL-7B-Instruct's config.
    "7b": dict(
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rms_norm_eps=1e-6,
            max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
        ),
    ),
    "tiny": dict(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
        ),
        vision=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]
        ),
    ),
}
IMAGE_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = "the quick brown fox jumps over a lazy dog while seven islands drift past under a pale sky".split()


def build_tokenizer():
    """A small ChatML tokenizer (its ids fit any vocabulary) with Qwen's image tokens."""
    from swiftune_tokenizers_fix.testing import build_chat_tokenizer

    tokenizer = build_chat_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    tokenizer.padding_side = "right"  # the tensor batch's labels mask the same prompt length in every row
    return tokenizer


def build_processor(tokenizer, image_size: int):
    """A Qwen2.5-VL processor: a small ChatML tokenizer (its ids fit any vocabulary) with Qwen's image processor,
    sized so that an ``image_size`` square image is kept as it is."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    from swiftune_loader.vision import image_only_processor_class
    from swiftune_loader.vision.testing import vision_chat_template

    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=image_size * image_size)
    template = vision_chat_template("<|vision_start|><|image_pad|><|vision_end|>")
    return image_only_processor_class(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )


def build_batch(tokenizer, batch: int, image_size: int, answer_words: int, source: str = "auto") -> tuple[str, dict]:
    """One batch (per row a noise image, a question and a long answer, the trained part) and where it came from:
    "collator" (VisionDataCollator with Qwen's image processor) or "tensors" (:func:`tensor_batch`)."""
    if image_size % 28:
        raise ValueError(f"--image-size must be a multiple of 28 (Qwen's merged patch), not {image_size}.")
    if source in ("auto", "collator"):
        try:
            return "collator", collated_batch(tokenizer, batch, image_size, answer_words)
        except ImportError as error:  # no pillow, no datasets, or a transformers without the pillow processor
            if source == "collator":
                raise
            print(f"note: no collator batch ({error}); building the batch from tensors", flush=True)
    return "tensors", tensor_batch(tokenizer, batch, image_size, answer_words)


def _answers(batch: int, answer_words: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=answer_words)) for _ in range(batch)]


def collated_batch(tokenizer, batch: int, image_size: int, answer_words: int) -> dict:
    """The batch as training collates it: VisionDataCollator over conversations with pillow noise images."""
    from PIL import Image

    from swiftune_data.vision_collator import VisionDataCollator

    processor = build_processor(tokenizer, image_size)
    rng = np.random.default_rng(0)
    rows = []
    for answer in _answers(batch, answer_words):
        image = Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": [image],
            }
        )
    return VisionDataCollator(processor, max_pixels=None)(rows)


def tensor_batch(tokenizer, batch: int, image_size: int, answer_words: int) -> dict:
    """The batch built from tensors only (no pillow, no image processor, no datasets): each image is
    ``(image_size / 14)^2`` pixel patches of 3 x 2 x 14 x 14 values (Qwen's patch, two frames), which the model
    merges 2 x 2 into ``(image_size / 28)^2`` image tokens; labels are the assistant answers, as the collator's."""
    side = image_size // 14
    image_tokens = side * side // 4
    image = "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
    prompt = f"<|im_start|>user\n{image}Describe the image.<|im_end|>\n<|im_start|>assistant\n"
    prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    texts = [prompt + answer + "<|im_end|>\n" for answer in _answers(batch, answer_words)]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt_length] = -100  # the prompt side is the same in every row (right padding)
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "mm_token_type_ids": (input_ids == image_id).to(torch.int32),
        "pixel_values": torch.randn(batch * side * side, 3 * 2 * 14 * 14, generator=generator),
        "image_grid_thw": torch.tensor([[1, side, side]] * batch),
    }


def build_model(shape: str, tokenizer, device: str, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in IMAGE_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(SHAPES[shape]["text"], pad_token_id=tokenizer.pad_token_id),
        vision_config=SHAPES[shape]["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def prepare(system: str, model, dtype: torch.dtype, swiftune_checkpointing):
    """The LoRA model and its loss function for ``system``."""
    from swiftune_loader.vision import FastVisionModel, patch_language_model, role_targets

    if system == "swiftune":
        patch_language_model(model)
        model = FastVisionModel.get_peft_model(
            model, r=16, lora_alpha=16, use_gradient_checkpointing=swiftune_checkpointing
        )
        from swiftune_loader.patching import fused_causal_lm_loss

        def loss_of(inputs):
            return fused_causal_lm_loss(model, inputs)
    else:
        from peft import LoraConfig, get_peft_model

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        lora = LoraConfig(r=16, lora_alpha=16, target_modules=role_targets(model), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)

        def loss_of(inputs):
            return model(**inputs).loss

    # Adapters in the model's dtype in both systems (peft would keep float32 copies otherwise).
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ".lora_" in name:
            parameter.data = parameter.data.to(dtype)
    return model, loss_of


def run(system: str, args, tokenizer, batch: dict, device: str, dtype: torch.dtype) -> dict:
    checkpointing = "offload" if args.swiftune_checkpointing == "offload" else True
    model, loss_of = prepare(system, build_model(args.shape, tokenizer, device, dtype), dtype, checkpointing)
    model.train()
    inputs = {k: v.to(device) for k, v in batch.items() if _accepts(model, k)}
    if inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=device == "cuda")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, first_loss = [], None
    for step in range(args.warmup + args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_of(inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            first_loss = loss.item()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times) if times else float("nan")
    tokens = int(batch["attention_mask"].sum())
    result = {
        "system": system if system != "swiftune" or checkpointing is True else "swiftune+offload",
        "shape": args.shape,
        "batch": args.batch,
        "image_size": args.image_size,
        "tokens_per_step": tokens,
        "image_tokens_per_step": int((batch["mm_token_type_ids"] != 0).sum()),
        "batch_source": args.batch_source,
        "first_loss": round(first_loss, 5),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    model = optimizer = None  # free the GPU memory before the next system
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def _accepts(model, key: str) -> bool:
    """Whether the model's forward takes ``key`` (older transformers have no ``mm_token_type_ids``)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return key in parameters or key != "mm_token_type_ids"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=448, help="square image side (448: 256 image tokens)")
    parser.add_argument("--answer-words", type=int, default=300, help="words of the trained answer per row")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--systems", default="transformers+peft,swiftune")
    parser.add_argument(
        "--swiftune-checkpointing",
        default="true",
        choices=("true", "offload"),
        help="swiftune's checkpointing: recompute (as the baseline) or also offload the language layers' inputs",
    )
    parser.add_argument(
        "--batch-source",
        default="auto",
        choices=("auto", "collator", "tensors"),
        help="collator: VisionDataCollator + Qwen's image processor (needs pillow, datasets); tensors: no extra "
        "package; auto: the collator when it can be imported",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shape, small batch, two steps, on the CPU")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.batch, args.image_size, args.answer_words, args.steps, args.warmup = "tiny", 2, 56, 20, 2, 1
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = build_tokenizer()
    args.batch_source, batch = build_batch(tokenizer, args.batch, args.image_size, args.answer_words, args.batch_source)
    results = []
    for system in args.systems.split(","):
        result = run(system, args, tokenizer, batch, device, dtype)
        print("RESULT " + json.dumps(result), flush=True)
        results.append(result)
    base = results[0]
    print(
        f"shape={args.shape} batch={args.batch} image={args.image_size}px tokens/step={base['tokens_per_step']} "
        f"(image {base['image_tokens_per_step']}) batch from {args.batch_source} device={base['device']}"
    )
    print(f"{'system':<20}{'tokens/s':>12}{'ratio':>8}{'peak GiB':>10}{'first loss':>12}")
    for r in results:
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"{r['system']:<20}{r['tokens_per_s']:>12.0f}{ratio:>8.2f}{str(r['peak_gib']):>10}{r['first_loss']:>12.4f}"
        )


if __name__ == "__main__":
    main()
