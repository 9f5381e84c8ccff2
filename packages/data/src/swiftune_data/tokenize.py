"""Rendering conversations with the tokenizer's chat template into input ids and response-only labels."""

from __future__ import annotations

import logging

from datasets import Dataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def tokenize_conversations(
    dataset: Dataset, tokenizer, max_length: int, train_on_responses_only: bool = True
) -> Dataset:
    """Tokenize a ``messages`` dataset into ``input_ids`` and ``labels``.

    With ``train_on_responses_only`` the labels are ``-100`` everywhere but the assistant turns (all of them),
    so the loss is computed on answers only. The assistant spans are found by rendering each conversation's
    prefixes with the chat template, which holds for templates whose renderings grow by appending.

    Args:
        dataset: a dataset with a ``messages`` column (see :func:`swiftune_data.standardize`).
        tokenizer: a tokenizer with a chat template.
        max_length: sequences are truncated to this many tokens.
        train_on_responses_only: mask everything but assistant turns.

    Raises:
        ValueError: no chat template, or every label of the dataset is masked.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat template; set one (tokenizer.chat_template = ...) first.")
    if "messages" not in dataset.column_names:
        raise ValueError(f"Expected a 'messages' column, found {dataset.column_names}; call standardize() first.")

    def encode(row):
        ids, labels = _encode_conversation(tokenizer, row["messages"], train_on_responses_only)
        return {"input_ids": ids[:max_length], "labels": labels[:max_length], "_truncated": len(ids) > max_length}

    tokenized = dataset.map(encode, remove_columns=dataset.column_names)
    truncated = sum(tokenized["_truncated"])
    tokenized = tokenized.remove_columns("_truncated")
    if truncated:
        logger.warning(
            "%d of %d conversations were longer than max_length=%d tokens and were truncated; raise max_length to "
            "keep their ends.",
            truncated,
            len(tokenized),
            max_length,
        )
    trainable = sum(sum(1 for label in row if label != IGNORE_INDEX) for row in tokenized["labels"])
    if trainable == 0:
        raise ValueError(
            "Every label is -100, so the loss would be zero and nothing would be learned: the chat template may not "
            f"mark assistant turns, or max_length={max_length} cuts them off."
        )
    return tokenized


def _render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes the special tokens (BOS, turn markers) itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_conversation(tokenizer, messages: list[dict], responses_only: bool) -> tuple[list[int], list[int]]:
    ids = _render_ids(tokenizer, messages, add_generation_prompt=False)
    if not responses_only:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render_ids(tokenizer, messages[:index], add_generation_prompt=True))
        end = len(_render_ids(tokenizer, messages[: index + 1], add_generation_prompt=False))
        labels[start:end] = ids[start:end]
    return ids, labels
