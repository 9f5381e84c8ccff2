"""VisionDataCollator: chat template, images from every source, response-only labels, padding, size bounds,
truncation, and errors that name the example and the file.

Two tiny processors: Qwen2-VL's (image tokens grow with the image size) and LLaVA's (a fixed count per image).
"""

import copy
import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from swiftune_data.images import bound_image_size, load_image
from swiftune_data.vision_collator import VisionDataCollator


def chat_template(image_placeholder):
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image_placeholder + "{% elif "
        "part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


@pytest.fixture(scope="module")
def qwen_processor():
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from swiftune_tokenizers_fix.testing import build_chat_tokenizer

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # transformers builds Qwen2-VL's video processor with torchvision only; these tests need images only.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    tokenizer = build_chat_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]}
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=512 * 512)
    template = chat_template("<|vision_start|><|image_pad|><|vision_end|>")
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


@pytest.fixture(scope="module")
def llava_processor():
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    from swiftune_tokenizers_fix.testing import build_chat_tokenizer

    tokenizer = build_chat_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="full",
        chat_template=chat_template("<image>"),
    )


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def image_turn(text, image=None):
    part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return {"role": "user", "content": [part, {"type": "text", "text": text}]}


def answer(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def example(image, question="What is this?", reply="A fox."):
    return {"messages": [image_turn(question, image), answer(reply)]}


def targets(batch, row):
    labels = batch["labels"][row]
    return labels[labels != -100].tolist()


def test_labels_are_exactly_the_assistant_turns(qwen_processor):
    tokenizer = qwen_processor.tokenizer
    conversation = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            image_turn("Two pictures:", picture(40, 30)),
            answer("A fox."),
            {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
            {"role": "assistant", "content": "Paris is the capital."},
        ],
        "images": [picture(56, 56, seed=1)],
    }
    batch = VisionDataCollator(qwen_processor)([conversation, example(picture(30, 30))])
    # Each assistant turn is its text and the end-of-turn marker the model must learn to emit.
    expected = [
        tokenizer.encode(t + "<|im_end|>\n", add_special_tokens=False) for t in ("A fox.", "Paris is the capital.")
    ]
    assert targets(batch, 0) == expected[0] + expected[1]
    assert targets(batch, 1) == expected[0]
    assert batch["pixel_values"].shape[0] > 0 and batch["image_grid_thw"].shape == (3, 3)


def test_without_response_masking_everything_but_padding_and_image_tokens_is_a_label(qwen_processor):
    short, long = example(picture(28, 28)), example(picture(84, 84), question="Describe the picture in detail.")
    batch = VisionDataCollator(qwen_processor, train_on_responses_only=False)([short, long])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    image = ids == qwen_processor.image_token_id
    assert image.any() and mask[0].sum() < mask[1].sum()
    assert (ids[0, mask[0] == 0] == qwen_processor.tokenizer.pad_token_id).all()  # right padding with the pad id
    assert mask[0].tolist() == sorted(mask[0].tolist(), reverse=True)
    assert torch.equal(labels[(mask == 1) & ~image], ids[(mask == 1) & ~image])
    assert (labels[(mask == 0) | image] == -100).all()


def test_a_text_only_example_batches_with_image_examples(llava_processor):
    text_only = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}
    batch = VisionDataCollator(llava_processor)([example(picture(40, 40)), text_only])
    tokenizer = llava_processor.tokenizer
    assert targets(batch, 1) == tokenizer.encode("hi there<|im_end|>\n", add_special_tokens=False)
    assert batch["pixel_values"].shape[0] == 1
    assert (batch["input_ids"][1] == llava_processor.image_token_id).sum() == 0


def test_images_from_paths_bytes_and_an_images_column_give_the_same_batch(llava_processor, tmp_path):
    image = picture(40, 30)
    image.save(tmp_path / "fox.png")
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    as_pil = example(image)
    variants = [
        example(str(tmp_path / "fox.png")),
        example(tmp_path / "fox.png"),
        example({"bytes": encoded.getvalue(), "path": None}),
        {"messages": [image_turn("What is this?"), answer("A fox.")], "images": [image]},
        {"messages": [image_turn("What is this?"), answer("A fox.")], "image": "fox.png"},
    ]
    collator = VisionDataCollator(llava_processor, image_root=tmp_path)
    reference = collator([as_pil])
    for variant in variants:
        batch = collator([variant])
        assert batch.keys() == reference.keys()
        for key in reference:
            assert torch.equal(batch[key], reference[key]), (variant, key)


def test_rows_of_a_datasets_table_collate_like_plain_dicts(qwen_processor):
    rows = [
        {"messages": [image_turn("What is this?"), answer("A fox.")], "images": [picture(40, 30)]},
        {"messages": [image_turn("And this?"), answer("A dog.")], "images": [picture(30, 40, seed=2)]},
    ]
    # Arrow gives every content part every key (absent ones as None) and stores the images as PIL again.
    table = datasets.Dataset.from_list(copy.deepcopy(rows))
    assert table[0]["messages"][0]["content"][0] == {"type": "image", "text": None}
    collator = VisionDataCollator(qwen_processor)
    from_table, from_dicts = collator([table[0], table[1]]), collator(rows)
    for key in from_dicts:
        assert torch.equal(from_table[key], from_dicts[key]), key


def test_missing_and_unreadable_images_name_the_example_and_the_file(llava_processor, tmp_path):
    collator = VisionDataCollator(llava_processor)
    good = example(picture(28, 28))
    with pytest.raises(FileNotFoundError, match=r"Example 1: image file '.*nowhere\.png' does not exist"):
        collator([good, example(str(tmp_path / "nowhere.png"))])
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"Example 2: '.*broken\.png' is not a readable image"):
        collator([good, good, example(str(tmp_path / "broken.png"))])
    with pytest.raises(ValueError, match="Example 0 has more image parts than images"):
        collator([{"messages": [image_turn("?"), answer("!")]}])
    with pytest.raises(ValueError, match="Example 0 lists 2 images but its messages have 1 image parts"):
        collator([{"messages": [image_turn("?"), answer("!")], "images": [picture(28, 28), picture(28, 28)]}])
    with pytest.raises(ValueError, match="Example 0 has no 'messages'"):
        collator([{"text": "hello"}])


def test_bound_image_size_scales_down_keeping_the_aspect_ratio_and_never_up():
    image = picture(400, 100)
    assert bound_image_size(image, max_pixels=400 * 100) is image
    assert bound_image_size(image, longest_edge=500) is image
    assert bound_image_size(image, max_pixels=100 * 25).size == (100, 25)
    assert bound_image_size(image, longest_edge=200).size == (200, 50)
    assert bound_image_size(image, max_pixels=10_000, longest_edge=100).size == (100, 25)
    assert load_image(picture(10, 10).convert("L"), 0).mode == "RGB"


def test_large_images_are_bounded_before_the_processor_so_they_take_fewer_tokens(qwen_processor):
    large = picture(224, 112)
    image_tokens = qwen_processor.image_token_id
    unbounded = VisionDataCollator(qwen_processor, max_pixels=None)([example(large)])
    bounded = VisionDataCollator(qwen_processor, max_pixels=112 * 56)([example(large)])
    edge = VisionDataCollator(qwen_processor, max_pixels=None, longest_edge=112)([example(large)])
    # The same image scaled by hand first: what the processor makes of it is what the collator must give.
    by_hand = VisionDataCollator(qwen_processor, max_pixels=None)([example(large.resize((112, 56), Image.BICUBIC))])
    for batch in (bounded, edge):
        assert torch.equal(batch["pixel_values"], by_hand["pixel_values"])
        assert (batch["input_ids"] == image_tokens).sum() == (by_hand["input_ids"] == image_tokens).sum()
    assert (unbounded["input_ids"] == image_tokens).sum() > 2 * (bounded["input_ids"] == image_tokens).sum()


def test_max_length_cuts_text_but_refuses_to_cut_image_tokens(qwen_processor):
    long_answer = example(picture(28, 28), reply="The quick brown fox jumps over the lazy dog. " * 4)
    full = VisionDataCollator(qwen_processor)([long_answer])
    cut_at = full["input_ids"].shape[1] - 5  # inside the answer
    cut = VisionDataCollator(qwen_processor, max_length=cut_at)([long_answer])
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        assert torch.equal(cut[key], full[key][:, :cut_at]), key
    assert torch.equal(cut["pixel_values"], full["pixel_values"])
    last_image_token = int((full["input_ids"][0] == qwen_processor.image_token_id).nonzero()[-1])
    with pytest.raises(ValueError, match="Example 0 needs .* tokens and its image tokens run to position"):
        VisionDataCollator(qwen_processor, max_length=last_image_token)([long_answer])


def test_a_batch_with_nothing_to_learn_is_refused(qwen_processor):
    question_only = {"messages": [image_turn("What is this?", picture(28, 28))]}
    with pytest.raises(ValueError, match="Every label of this batch is -100"):
        VisionDataCollator(qwen_processor)([question_only])


def test_a_template_that_does_not_render_by_appending_is_reported(qwen_processor):
    processor = copy.copy(qwen_processor)
    # Closes the conversation with an extra marker only when it is complete: prefixes are no longer prefixes.
    processor.chat_template = (
        qwen_processor.chat_template + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"
    )
    two_turns = {
        "messages": [image_turn("?", picture(28, 28)), answer("A."), image_turn("?", picture(28, 28)), answer("B.")]
    }
    with pytest.raises(ValueError, match="Example 0: the chat template does not render"):
        VisionDataCollator(processor)([two_turns])
    assert VisionDataCollator(processor, train_on_responses_only=False)([two_turns])["labels"].shape[0] == 1


def test_the_collator_needs_a_processor_with_a_template_and_pad_token(qwen_processor):
    with pytest.raises(ValueError, match="needs a transformers processor"):
        VisionDataCollator(qwen_processor.tokenizer)
    with pytest.raises(ValueError, match="max_pixels must be a positive number"):
        VisionDataCollator(qwen_processor, max_pixels=0)
