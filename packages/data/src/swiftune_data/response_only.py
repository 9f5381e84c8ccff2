"""Response-only labels found on token ids: -100 everywhere but the assistant turns.

The assistant turns are located by searching the token ids of the turn markers (e.g. ``<|im_start|>assistant\\n``)
in ``input_ids``. A marker does not always tokenize the same alone and in context: byte-level BPE merges a leading
space into the next word (`` ASSISTANT:`` is not ``ASSISTANT:`` with a space before it), GPT-2's pre-tokenizer keeps
a trailing ``\\n\\n`` whole only at the end of a text, and sentencepiece adds a word prefix. Each marker is
therefore tokenized in a few contexts, and every variant is searched.
"""

from __future__ import annotations

from datasets import Dataset

from swiftune_data.chat_templates.apply import registered_template_of
from swiftune_data.tokenize import IGNORE_INDEX

# Text that may precede a marker in a rendered conversation: nothing (start of text or after a special token),
# a space (Vicuna's "... USER:"), newlines (Alpaca's "\n\n### Response:") and a word (text right before it).
_CONTEXTS = ("", " ", "\n", "\n\n", "x", "x ", "x\n", ".\n\n")
# Text that may follow it: the reply's first word, a space, a digit or a newline. GPT-2-style pre-tokenizers split
# "\n\n" into "\n" "\n" before a word but keep it whole at the end of the text, so the end matters too.
_AFTER = ("", "A", "a", " a", "1", "\n", "<")


def train_on_responses_only(
    dataset_or_tokenized,
    tokenizer,
    instruction_part: str | None = None,
    response_part: str | None = None,
    last_turn_only: bool = False,
    max_length: int | None = None,
):
    """Set ``labels`` to the input ids of the assistant turns and to -100 everywhere else.

    A response starts right after a ``response_part`` and runs to the next ``instruction_part`` (or the end of the
    sequence), so it includes the end-of-turn token the model must learn to emit.

    Args:
        dataset_or_tokenized: a ``datasets.Dataset`` (or a list of row dicts) holding ``input_ids``, or a Dataset
            holding ``messages`` (rendered with the tokenizer's chat template) or ``text`` (already rendered).
        tokenizer: the tokenizer that produced, or will produce, the ids.
        instruction_part: the text that opens a user turn; taken from the registered chat template when None.
        response_part: the text that opens an assistant turn; taken from the registered chat template when None.
        last_turn_only: label only the last assistant turn of each conversation.
        max_length: truncate sequences that this function tokenizes to this many tokens.

    Returns:
        The same kind of object with ``input_ids`` and ``labels`` (a Dataset keeps its other columns).

    Raises:
        ValueError: markers are missing and the chat template is not a registered one, a marker is empty, the
            dataset has none of the expected columns, or no label is left to train on.
    """
    from swiftune_tokenizers_fix import check_labels

    instruction_part, response_part = _markers(tokenizer, instruction_part, response_part)
    instruction_variants = marker_token_variants(tokenizer, instruction_part)
    response_variants = marker_token_variants(tokenizer, response_part)

    def label(ids: list[int]) -> list[int]:
        return response_only_labels(ids, instruction_variants, response_variants, last_turn_only)

    if isinstance(dataset_or_tokenized, list):
        rows = [{**row, "labels": label(list(row["input_ids"]))} for row in dataset_or_tokenized]
        check_labels(rows)
        return rows
    dataset = _tokenized(dataset_or_tokenized, tokenizer, max_length)
    dataset = dataset.map(lambda row: {"labels": label(row["input_ids"])})
    check_labels(dataset)
    return dataset


def response_only_labels(
    input_ids: list[int],
    instruction_variants: list[tuple[int, ...]],
    response_variants: list[tuple[int, ...]],
    last_turn_only: bool = False,
) -> list[int]:
    """Labels of one sequence given the token-id variants of both markers (see :func:`marker_token_variants`)."""
    events = _find(input_ids, instruction_variants, "instruction") + _find(input_ids, response_variants, "response")
    events.sort(key=lambda event: (event[0], -(event[1] - event[0])))
    spans, start, taken_until = [], None, 0
    for begin, end, kind in events:
        if begin < taken_until:  # overlaps a marker already taken (a shorter variant at the same place)
            continue
        taken_until = end
        if start is not None:
            spans.append((start, begin))
            start = None
        if kind == "response":
            start = end
    if start is not None:
        spans.append((start, len(input_ids)))
    spans = [span for span in spans if span[1] > span[0]]
    if last_turn_only:
        spans = spans[-1:]
    labels = [IGNORE_INDEX] * len(input_ids)
    for begin, end in spans:
        labels[begin:end] = input_ids[begin:end]
    return labels


def marker_token_variants(tokenizer, marker: str) -> list[tuple[int, ...]]:
    """The token-id sequences ``marker`` can take in a rendered conversation, longest first.

    The marker is tokenized between each pair of a leading and a trailing context, and the ids whose characters lie
    inside the marker are kept. A token that also covers leading whitespace (byte-level BPE's `` ASSISTANT``) is
    kept, since that space belongs to the prompt anyway; a token that runs past the marker's end into the reply is
    not, so the match stops before it.
    """
    if not marker:
        raise ValueError("A turn marker is empty; pass the text that opens a user or assistant turn.")
    variants = set()
    for before in _CONTEXTS:
        for after in _AFTER:
            variants.add(_marker_ids_in_context(tokenizer, before, marker, after))
    return sorted((v for v in variants if v), key=len, reverse=True)


def _marker_ids_in_context(tokenizer, before: str, marker: str, after: str) -> tuple[int, ...]:
    text = before + marker + after
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    low, high = len(before), len(before) + len(marker)
    kept = []
    for token_id, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        inside = low <= start and end <= high and end > start
        leading_space = start < low < end <= high and not text[start:low].strip()
        if inside or leading_space:
            kept.append(token_id)
    return tuple(kept)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _find(ids: list[int], variants: list[tuple[int, ...]], kind: str) -> list[tuple[int, int, str]]:
    by_first: dict[int, list[tuple[int, ...]]] = {}
    for variant in variants:
        by_first.setdefault(variant[0], []).append(variant)
    found = []
    for position, token in enumerate(ids):
        for variant in by_first.get(token, ()):
            if tuple(ids[position : position + len(variant)]) == variant:
                found.append((position, position + len(variant), kind))
                break  # variants are longest first: the longest match at a position wins
    return found


def _markers(tokenizer, instruction_part: str | None, response_part: str | None) -> tuple[str, str]:
    if instruction_part is not None and response_part is not None:
        return instruction_part, response_part
    spec = registered_template_of(tokenizer)
    if spec is None:
        raise ValueError(
            "The tokenizer's chat template is not a registered one, so the turn markers are unknown: pass "
            "instruction_part and response_part (e.g. '<|im_start|>user\\n' and '<|im_start|>assistant\\n'), or "
            "set a template with swiftune_data.get_chat_template."
        )
    return instruction_part or spec.instruction_part, response_part or spec.response_part


def _tokenized(dataset: Dataset, tokenizer, max_length: int | None) -> Dataset:
    columns = dataset.column_names
    if "input_ids" in columns:
        return dataset
    if "messages" in columns:

        def encode(row):
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            return {"input_ids": _encode(tokenizer, text)[:max_length]}

    elif "text" in columns:

        def encode(row):
            return {"input_ids": _encode(tokenizer, row["text"])[:max_length]}

    else:
        raise ValueError(
            f"Expected 'input_ids', 'messages' or 'text' in the dataset, found {columns}; call standardize() first."
        )
    return dataset.map(encode, remove_columns=[c for c in columns if c in ("messages", "text")])
