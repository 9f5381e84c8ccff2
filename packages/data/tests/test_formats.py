import datasets
import pytest

from swiftune_data import detect_format, standardize

EXPECTED = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": EXPECTED}, "messages"),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "sharegpt"),
        ({"instruction": "Q", "input": "", "output": "A"}, "alpaca"),
        ({"prompt": "Q", "completion": "A"}, "prompt_completion"),
    ],
)
def test_every_format_becomes_messages(row, fmt):
    dataset = datasets.Dataset.from_list([row])
    assert detect_format(dataset.column_names) == fmt
    assert standardize(dataset)["messages"] == [EXPECTED]


def test_alpaca_input_is_appended_to_the_instruction():
    dataset = datasets.Dataset.from_list([{"instruction": "Translate", "input": "bonjour", "output": "hello"}])
    assert standardize(dataset)["messages"][0][0]["content"] == "Translate\n\nbonjour"


def test_openai_content_parts_are_joined():
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        ]
    }
    assert standardize(datasets.Dataset.from_list([row]))["messages"] == [EXPECTED]


def test_unknown_format_names_columns_and_known_formats():
    dataset = datasets.Dataset.from_list([{"question": "Q", "answer": "A"}])
    with pytest.raises(ValueError, match=r"\['answer', 'question'\].*alpaca \(instruction, output\)"):
        standardize(dataset)


def test_conversation_without_assistant_turn_is_refused():
    dataset = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Q"}]}])
    with pytest.raises(ValueError, match="no assistant turn"):
        standardize(dataset)


def test_unknown_role_is_refused():
    dataset = datasets.Dataset.from_list([{"messages": [{"role": "robot", "content": "Q"}]}])
    with pytest.raises(ValueError, match="Unknown role 'robot'"):
        standardize(dataset)


def test_raw_text_is_pointed_to_chunk_text():
    dataset = datasets.Dataset.from_list([{"text": "Once upon a time."}])
    with pytest.raises(ValueError, match=r"\['text'\].*preference \(chosen, rejected\).*use chunk_text\(\)"):
        standardize(dataset)


@pytest.mark.parametrize("empty", ["", "   \n"])
def test_empty_turn_is_refused(empty):
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": empty}]}
    with pytest.raises(ValueError, match="empty assistant turn \\(turn 2 of 2\\)"):
        standardize(datasets.Dataset.from_list([row]))
