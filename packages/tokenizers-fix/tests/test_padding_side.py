import pytest

from swiftune_tokenizers_fix import for_generation, for_training, set_padding_side
from swiftune_tokenizers_fix.testing import build_chat_tokenizer


def test_padding_side_is_right_for_training_and_left_for_generation(repair_log):
    tokenizer = build_chat_tokenizer()
    tokenizer.padding_side = "left"

    repair = for_training(tokenizer)
    assert repair.kind == "padding_side" and tokenizer.padding_side == "right"
    batch = tokenizer(["hi", "hello there friend"], padding=True)["input_ids"]
    assert batch[0][-1] == tokenizer.pad_token_id and batch[0][0] != tokenizer.pad_token_id

    repair = for_generation(tokenizer)
    assert "'left' for generation" in repair.did and tokenizer.padding_side == "left"
    batch = tokenizer(["hi", "hello there friend"], padding=True)["input_ids"]
    assert batch[0][0] == tokenizer.pad_token_id and batch[0][-1] != tokenizer.pad_token_id

    assert for_generation(tokenizer) is None  # already left: nothing to repair, nothing logged
    assert len(repair_log()) == 2


def test_unknown_padding_side_is_refused():
    with pytest.raises(ValueError, match="'right' \\(training\\) or 'left' \\(generation\\)"):
        set_padding_side(build_chat_tokenizer(), "center")
