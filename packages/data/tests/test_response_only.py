import datasets
import pytest

from swiftune_data import (
    CHAT_TEMPLATES,
    IGNORE_INDEX,
    get_chat_template,
    marker_token_variants,
    train_on_responses_only,
)
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

SYSTEM, QUESTIONS, ANSWERS = (
    "Be brief.",
    ["Where is Quillhaven?", "When was it founded?"],
    ["In the Sea of Marrow.", "In 1742."],
)
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTIONS[0]},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": QUESTIONS[1]},
    {"role": "assistant", "content": ANSWERS[1]},
]


def _labeled_text(tokenizer, row):
    return tokenizer.decode([label for label in row["labels"] if label != IGNORE_INDEX])


def _expected_spans(text, instruction_part, response_part):
    """The trained text found on characters, independently of token ids: from the end of each response marker to
    the next instruction marker (or the end)."""
    spans, position = [], 0
    while (start := text.find(response_part, position)) != -1:
        start += len(response_part)
        end = text.find(instruction_part, start)
        end = len(text) if end == -1 else end
        spans.append(text[start:end])
        position = end
    return spans


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_only_assistant_turns_are_trained_for_every_template(name):
    tokenizer = get_chat_template(build_chat_tokenizer(), name)
    spec = CHAT_TEMPLATES[name]
    row = train_on_responses_only(datasets.Dataset.from_list([{"messages": MESSAGES}]), tokenizer)[0]
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    spans = _expected_spans(text, spec.instruction_part, spec.response_part)
    assert len(spans) == 2
    assert _labeled_text(tokenizer, row) == "".join(spans)
    labeled = _labeled_text(tokenizer, row)
    assert all(answer in labeled for answer in ANSWERS)
    assert not any(prompt in labeled for prompt in [SYSTEM, *QUESTIONS])
    for label, token in zip(row["labels"], row["input_ids"], strict=True):
        assert label in (IGNORE_INDEX, token)


@pytest.mark.parametrize("name", ["chatml", "llama-3.1", "vicuna"])
def test_last_turn_only(name):
    tokenizer = get_chat_template(build_chat_tokenizer(), name)
    row = train_on_responses_only(datasets.Dataset.from_list([{"messages": MESSAGES}]), tokenizer, last_turn_only=True)[
        0
    ]
    labeled = _labeled_text(tokenizer, row)
    assert ANSWERS[1] in labeled and ANSWERS[0] not in labeled


def test_marker_found_only_through_its_tokenization_in_context():
    # Vicuna writes " ASSISTANT:" after the question: byte-level BPE merges the space into the word, so the marker
    # tokenized alone never occurs in the ids; only a context variant finds it. The tokenizer is trained on Vicuna
    # text so that it learns that merge.
    corpus = ["USER: Where is it? ASSISTANT: In the Sea of Marrow.", "USER: When? ASSISTANT: In 1742."]
    tokenizer = get_chat_template(build_chat_tokenizer(corpus=corpus), "vicuna")
    ids = tokenizer(tokenizer.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False)["input_ids"]
    alone = tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert not any(ids[i : i + len(alone)] == alone for i in range(len(ids)))
    assert any(list(v) != alone for v in marker_token_variants(tokenizer, "ASSISTANT:"))
    row = train_on_responses_only([{"input_ids": ids}], tokenizer)[0]
    assert _labeled_text(tokenizer, row) == f" {ANSWERS[0]}<|im_end|> {ANSWERS[1]}<|im_end|>"


def test_explicit_markers_and_pre_tokenized_input(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    dataset = datasets.Dataset.from_list([{"input_ids": ids, "extra": 1}])
    row = train_on_responses_only(dataset, tokenizer, "<|im_start|>user\n", "<|im_start|>assistant\n")[0]
    assert row["extra"] == 1 and row["input_ids"] == ids
    assert _labeled_text(tokenizer, row) == f"{ANSWERS[0]}<|im_end|>\n{ANSWERS[1]}<|im_end|>\n"


def test_rendered_text_column(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    row = train_on_responses_only(datasets.Dataset.from_list([{"text": text}]), tokenizer)[0]
    assert _labeled_text(tokenizer, row) == f"{ANSWERS[0]}<|im_end|>\n{ANSWERS[1]}<|im_end|>\n"


def test_no_trainable_label_left_is_an_error(tokenizer):
    dataset = datasets.Dataset.from_list([{"messages": MESSAGES}])
    with pytest.raises(ValueError, match="Every one of the .* labels is -100"):
        train_on_responses_only(dataset, tokenizer, max_length=8)  # cut before the first answer
    with pytest.raises(ValueError, match="labels is -100"):
        train_on_responses_only(dataset, tokenizer, response_part="<|im_start|>robot\n")


def test_unregistered_template_needs_explicit_markers(tokenizer):
    bare = build_chat_tokenizer()
    bare.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="pass instruction_part and response_part"):
        train_on_responses_only(datasets.Dataset.from_list([{"messages": MESSAGES}]), bare)
    row = train_on_responses_only(datasets.Dataset.from_list([{"messages": MESSAGES}]), bare, "user:", "assistant:")[0]
    assert _labeled_text(bare, row) == f" {ANSWERS[0]}\n {ANSWERS[1]}\n"


def test_missing_columns(tokenizer):
    with pytest.raises(ValueError, match="Expected 'input_ids', 'messages' or 'text'"):
        train_on_responses_only(datasets.Dataset.from_list([{"question": "Q"}]), tokenizer)
