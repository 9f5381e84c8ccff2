"""Batching conversations with images for vision-language models: chat template, images, labels, padding.

An example is ``{"messages": [...]}`` whose message contents are strings or lists of parts,
``{"type": "text", "text": ...}`` and ``{"type": "image", "image": <PIL image | path | {"bytes", "path"}>}``.
Image parts may also leave the image out and take it, in order, from the example's ``images`` list (or its single
``image``), as TRL's vision datasets do. Images are opened and bounded in size here, on the fly, because turning
every image into pixels ahead of time would take more memory and disk than the model.
"""

from __future__ import annotations

import logging
import os

import torch

from swiftune_data.images import bound_image_size, load_image
from swiftune_data.tokenize import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Per-token tensors a processor may return beside input_ids (cut together when a batch is truncated).
_TOKEN_LEVEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "cross_attention_mask")


class VisionDataCollator:
    """Turn a list of conversations with images into one padded batch with labels.

    The chat template is the processor's; the processor expands each image into its image tokens and pixels. Labels
    are the input ids with -100 on padding, on image tokens (they are inputs, not text to predict) and, with
    ``train_on_responses_only``, everywhere but the assistant turns. Assistant turns are found by rendering each
    conversation's prefixes through the processor, which holds for templates whose renderings grow by appending
    (a template that does not is reported, not guessed at).

    Args:
        processor: a transformers processor with a chat template (e.g. from ``FastVisionModel.from_pretrained``).
        train_on_responses_only: compute the loss on assistant turns only.
        max_length: longest sequence in tokens (image tokens included); longer ones lose their end, which must not
            reach into image tokens (a clear error says so). None: no limit.
        max_pixels: scale larger images down to this many pixels (aspect ratio kept); None: no bound.
        longest_edge: scale images down so that no side is longer; None: no bound.
        image_root: the folder that relative image paths are read from; None: the working directory.
        pad_to_multiple_of: pad the sequence length to a multiple of this (tensor-core friendly shapes).

    Raises:
        ValueError: a processor without a chat template or pad token, or a non-positive bound.
    """

    def __init__(
        self,
        processor,
        train_on_responses_only: bool = True,
        max_length: int | None = None,
        max_pixels: int | None = 1024 * 1024,
        longest_edge: int | None = None,
        image_root: str | os.PathLike | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or not callable(getattr(processor, "apply_chat_template", None)):
            raise ValueError("VisionDataCollator needs a transformers processor (with a tokenizer), not a tokenizer.")
        if not (getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)):
            raise ValueError("The processor has no chat template; set processor.chat_template = ... first.")
        if tokenizer.pad_token_id is None:
            raise ValueError("The processor's tokenizer has no pad token; set processor.tokenizer.pad_token first.")
        for name, value in (("max_length", max_length), ("max_pixels", max_pixels), ("longest_edge", longest_edge)):
            if value is not None and int(value) <= 0:
                raise ValueError(f"{name} must be a positive number or None, got {value!r}.")
        self.processor = processor
        self.train_on_responses_only = train_on_responses_only
        self.max_length = max_length
        self.max_pixels = max_pixels
        self.longest_edge = longest_edge
        self.image_root = image_root
        self.pad_to_multiple_of = pad_to_multiple_of
        self._image_token_ids = _image_token_ids(processor)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Collate ``examples`` (see the module docstring for their form) into model inputs with ``labels``."""
        prepared = [self._prepare(example, index) for index, example in enumerate(examples)]
        texts = [self._render(messages, add_generation_prompt=False) for messages, _ in prepared]
        images = [example_images for _, example_images in prepared]
        batch = self.processor(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            padding_side="right",
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_tensors="pt",
            add_special_tokens=False,  # the chat template writes the special tokens itself
        )
        batch = dict(batch)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        labels[self._image_positions(batch)] = IGNORE_INDEX
        if self.train_on_responses_only:
            for row, (messages, example_images) in enumerate(prepared):
                keep = torch.zeros(labels.shape[1], dtype=torch.bool)
                for start, end in self._assistant_spans(messages, example_images, batch["input_ids"][row], row):
                    keep[start:end] = True
                labels[row, ~keep] = IGNORE_INDEX
        batch["labels"] = labels
        if self.max_length is not None and labels.shape[1] > self.max_length:
            batch = self._truncate(batch)
        if not (batch["labels"] != IGNORE_INDEX).any():
            raise ValueError(
                "Every label of this batch is -100, so it would teach nothing: its conversations have no assistant "
                f"turn, or max_length={self.max_length} cuts the answers off."
            )
        return batch

    def _prepare(self, example: dict, index: int) -> tuple[list[dict], list]:
        """The messages as the chat template takes them (image parts reduced to ``{"type": "image"}``) and the
        example's images, opened and bounded, in order of appearance."""
        if "messages" not in example:
            raise ValueError(f"Example {index} has no 'messages' (it has {sorted(example)}); give each example one.")
        listed = example.get("images")
        if listed is None and example.get("image") is not None:
            listed = [example["image"]]
        listed = list(listed or [])
        messages, sources, taken = [], [], 0
        for message in example["messages"]:
            content = message["content"]
            if isinstance(content, str):
                messages.append({"role": message["role"], "content": content})
                continue
            parts = []
            for part in content:
                part = {key: value for key, value in part.items() if value is not None}  # datasets fills absent keys
                if part.get("type") != "image":
                    parts.append(part)
                    continue
                source = next((part[k] for k in ("image", "path", "url") if k in part), None)
                if source is None:
                    if taken >= len(listed):
                        raise ValueError(
                            f"Example {index} has more image parts than images ({len(listed)} in 'images'); give "
                            "each {'type': 'image'} part its image."
                        )
                    source, taken = listed[taken], taken + 1
                sources.append(source)
                parts.append({"type": "image"})
            messages.append({"role": message["role"], "content": parts})
        if taken < len(listed):
            raise ValueError(
                f"Example {index} lists {len(listed)} images but its messages have {taken} image parts to put them "
                "in; add {'type': 'image'} parts where the images belong."
            )
        images = [
            bound_image_size(load_image(source, index, self.image_root), self.max_pixels, self.longest_edge)
            for source in sources
        ]
        return messages, images

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _ids(self, messages: list[dict], images: list, add_generation_prompt: bool) -> list[int]:
        """The token ids of a rendering of ``messages`` with the images it refers to."""
        text = self._render(messages, add_generation_prompt)
        wanted = sum(
            1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image"
        )
        encoded = self.processor(text=[text], images=[images[:wanted]] if wanted else None, add_special_tokens=False)
        return list(encoded["input_ids"][0])

    def _assistant_spans(self, messages, images, input_ids: torch.Tensor, row: int) -> list[tuple[int, int]]:
        """(start, end) token positions of each assistant turn of one conversation."""
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._ids(messages[:index], images, add_generation_prompt=True)
            through = self._ids(messages[: index + 1], images, add_generation_prompt=False)
            full = input_ids[: len(through)].tolist()
            if full[: len(before)] != before or full != through:
                raise ValueError(
                    f"Example {row}: the chat template does not render a conversation's beginning as the beginning "
                    "of the whole conversation, so its assistant turns cannot be found; pass "
                    "train_on_responses_only=False, or use a template that renders turns by appending."
                )
            spans.append((len(before), len(through)))
        return spans

    def _image_positions(self, batch: dict) -> torch.Tensor:
        """True where a token stands for image features: the processor's own token-type mask when it gives one
        (Qwen2-VL, Gemma 3), else the image placeholder token ids."""
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in batch:
                return batch[key] != 0
        return torch.isin(batch["input_ids"], torch.tensor(sorted(self._image_token_ids), dtype=torch.long))

    def _truncate(self, batch: dict) -> dict:
        """Cut every per-token tensor to ``max_length``; an image token past the cut is an error (its pixels would
        be left without a place in the sequence)."""
        images = self._image_positions(batch)
        lengths = batch["attention_mask"].sum(dim=1)
        for row in range(images.shape[0]):
            positions = images[row].nonzero()
            if len(positions) and int(positions[-1]) >= self.max_length:
                raise ValueError(
                    f"Example {row} needs {int(lengths[row])} tokens and its image tokens run to position "
                    f"{int(positions[-1])}, past max_length={self.max_length}: raise max_length, or lower max_pixels "
                    "or longest_edge so that its images take fewer tokens."
                )
        logger.warning(
            "%d of %d examples were longer than max_length=%d tokens and lost their ends.",
            int((lengths > self.max_length).sum()),
            len(lengths),
            self.max_length,
        )
        seq_len = batch["input_ids"].shape[1]
        for key, value in batch.items():
            per_token = key in _TOKEN_LEVEL_KEYS or key == "labels"
            if per_token and isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq_len:
                batch[key] = value[:, : self.max_length]
        return batch


def _image_count(messages: list[dict]) -> int:
    return sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image")


def _image_token_ids(processor) -> set[int]:
    """Ids of the tokens that a processor replaces with image features (the fallback of ``_image_positions``)."""
    tokenizer = processor.tokenizer
    ids = {getattr(processor, "image_token_id", None)}
    for owner in (processor, tokenizer):
        token = getattr(owner, "image_token", None)
        if isinstance(token, str):
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}
