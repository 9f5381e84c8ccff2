import copy

import datasets
import pytest

from swiftune_data import IGNORE_INDEX, tokenize_conversations


def _labeled_text(tokenizer, row):
    return tokenizer.decode([label for label in row["labels"] if label != IGNORE_INDEX])


def test_only_assistant_turns_are_labeled(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is Quillhaven?"},
        {"role": "assistant", "content": "In the Sea of Marrow."},
        {"role": "user", "content": "When was it founded?"},
        {"role": "assistant", "content": "In 1742."},
    ]
    row = tokenize_conversations(datasets.Dataset.from_list([{"messages": messages}]), tokenizer, 512)[0]
    assert len(row["labels"]) == len(row["input_ids"])
    # Both answers with their end-of-turn markers are trained; nothing of the prompt is.
    assert _labeled_text(tokenizer, row) == "In the Sea of Marrow.<|im_end|>\nIn 1742.<|im_end|>\n"
    for label, token in zip(row["labels"], row["input_ids"], strict=True):
        assert label in (IGNORE_INDEX, token)


def test_all_tokens_are_labeled_when_asked(tokenizer):
    dataset = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    )
    row = tokenize_conversations(dataset, tokenizer, 512, train_on_responses_only=False)[0]
    assert row["labels"] == row["input_ids"]


def test_truncation_to_max_length(tokenizer):
    dataset = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "Q " * 50}, {"role": "assistant", "content": "A " * 50}]}]
    )
    row = tokenize_conversations(dataset, tokenizer, 64, train_on_responses_only=False)[0]
    assert len(row["input_ids"]) == 64


def test_answers_cut_off_by_max_length_is_an_error(tokenizer):
    dataset = datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "question " * 40}, {"role": "assistant", "content": "A"}]}]
    )
    with pytest.raises(ValueError, match="Every label is -100"):
        tokenize_conversations(dataset, tokenizer, 16)


def test_tokenizer_without_chat_template_is_an_error(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    dataset = datasets.Dataset.from_list([{"messages": [{"role": "assistant", "content": "A"}]}])
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_conversations(dataset, bare, 32)


def test_truncated_conversations_are_counted(tokenizer, caplog):
    long = {"messages": [{"role": "user", "content": "Q " * 50}, {"role": "assistant", "content": "A " * 50}]}
    short = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    with caplog.at_level("WARNING", logger="swiftune_data"):
        tokenize_conversations(datasets.Dataset.from_list([long, short, long]), tokenizer, 64)
    assert "2 of 3 conversations were longer than max_length=64 tokens and were truncated" in caplog.text
