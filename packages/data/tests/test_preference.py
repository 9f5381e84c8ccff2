import datasets
import pytest

from swiftune_data import detect_format, standardize, standardize_preference

QUESTION = [{"role": "user", "content": "Where is Quillhaven?"}]
GOOD = [{"role": "assistant", "content": "In the Sea of Marrow."}]
BAD = [{"role": "assistant", "content": "On the Moon."}]
EXPECTED = {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD}


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": QUESTION[0]["content"], "chosen": GOOD[0]["content"], "rejected": BAD[0]["content"]},
        {"prompt": QUESTION, "chosen": GOOD, "rejected": BAD},
        {"chosen": QUESTION + GOOD, "rejected": QUESTION + BAD},  # implicit prompt: the shared leading turns
    ],
    ids=["strings", "messages", "implicit_prompt"],
)
def test_preference_layouts_become_prompt_chosen_rejected(row):
    assert standardize_preference(datasets.Dataset.from_list([row])).to_list() == [EXPECTED]


def test_implicit_prompt_keeps_earlier_turns_in_the_prompt():
    history = [{"role": "system", "content": "Be brief."}, *QUESTION, *GOOD, {"role": "user", "content": "When?"}]
    row = {
        "chosen": history + [{"role": "assistant", "content": "1742."}],
        "rejected": history + [{"role": "assistant", "content": "Never."}],
    }
    pair = standardize_preference(datasets.Dataset.from_list([row]))[0]
    assert pair["prompt"] == history
    assert pair["chosen"] == [{"role": "assistant", "content": "1742."}]


def test_standardize_trains_on_the_chosen_answer():
    dataset = datasets.Dataset.from_list([{"prompt": "Q", "chosen": "good", "rejected": "bad"}])
    assert detect_format(dataset.column_names) == "preference"
    assert standardize(dataset)["messages"] == [
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}]
    ]


def test_prompt_must_end_with_a_user_turn():
    row = {"prompt": GOOD, "chosen": GOOD, "rejected": BAD}
    with pytest.raises(ValueError, match="must end with a user turn"):
        standardize_preference(datasets.Dataset.from_list([row]))


def test_answers_must_be_assistant_turns():
    row = {"prompt": QUESTION, "chosen": QUESTION, "rejected": BAD}
    with pytest.raises(ValueError, match="'chosen' answer must be one or more assistant turns"):
        standardize_preference(datasets.Dataset.from_list([row]))


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"chosen and rejected .*\['prompt', 'response'\]"):
        standardize_preference(datasets.Dataset.from_list([{"prompt": "Q", "response": "A"}]))
