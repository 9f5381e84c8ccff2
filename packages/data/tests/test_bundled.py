import pytest

from swiftune_data import bundled_dataset_path, load_conversations


def test_bundled_splits_load_as_conversations():
    train, test = load_conversations(bundled_dataset_path("train")), load_conversations(bundled_dataset_path("test"))
    assert len(train) >= 200 and len(test) >= 20
    assert all(m[-1]["role"] == "assistant" for m in train["messages"])


def test_held_out_questions_never_appear_in_training():
    def questions(split):
        rows = load_conversations(bundled_dataset_path(split))["messages"]
        return {m["content"] for row in rows for m in row if m["role"] == "user"}

    assert not questions("test") & questions("train")


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be"):
        bundled_dataset_path("validation")
