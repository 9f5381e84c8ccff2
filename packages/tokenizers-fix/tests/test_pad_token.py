"""A pad token distinct from EOS, reusing a reserved token where there is one, and the model told about it."""

import pytest

from swiftune_tokenizers_fix import fix_pad_token
from swiftune_tokenizers_fix.testing import build_chat_tokenizer, build_sentencepiece_folder, build_tiny_llama


def _masked_labels(tokenizer, text):
    """Labels as a collator that masks padding builds them: every pad id becomes -100."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [-100 if i == tokenizer.pad_token_id else i for i in ids]


@pytest.mark.parametrize(
    ("reserved", "chosen"),
    [
        (["<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"], "<|finetune_right_pad_id|>"),
        (["<|reserved_special_token_0|>", "<|reserved_special_token_1|>"], "<|reserved_special_token_1|>"),
    ],
)
def test_pad_equal_to_eos_reuses_a_reserved_token_and_updates_the_model(repair_log, reserved, chosen):
    tokenizer = build_chat_tokenizer(pad_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": reserved})
    tokenizer.pad_token = tokenizer.eos_token
    model = build_tiny_llama(tokenizer)
    size = len(tokenizer)
    assert _masked_labels(tokenizer, "hi<|im_end|>")[-1] == -100  # the defect: EOS is masked out of the labels

    repair = fix_pad_token(tokenizer, model)

    assert repair.kind == "pad_token" and "equal to EOS" in repair.found
    assert tokenizer.pad_token == chosen and len(tokenizer) == size
    assert _masked_labels(tokenizer, "hi<|im_end|>")[-1] == tokenizer.eos_token_id
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert repair_log() == [str(repair)]


def test_missing_pad_token_is_added_when_nothing_can_be_reused(repair_log):
    tokenizer = build_chat_tokenizer(pad_token=None)  # its unknown token is BOS, so it cannot pad
    size = len(tokenizer)

    repair = fix_pad_token(tokenizer)

    assert "no pad token" in repair.found and "added" in repair.did
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == size and len(tokenizer) == size + 1
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert tokenizer("a<|pad|>")["input_ids"][-1] == tokenizer.pad_token_id
    assert len(repair_log()) == 1


def test_sentencepiece_tokenizer_pads_with_its_unknown_token(tmp_path):
    from swiftune_tokenizers_fix import load_tokenizer

    tokenizer = load_tokenizer(build_sentencepiece_folder(tmp_path / "tok"))
    tokenizer.pad_token = tokenizer.eos_token
    repair = fix_pad_token(tokenizer)
    assert tokenizer.pad_token == "<unk>" and "unknown token" in repair.did


def test_model_config_out_of_step_with_a_good_pad_token_is_updated(repair_log):
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    model.config.pad_token_id = tokenizer.eos_token_id
    repair = fix_pad_token(tokenizer, model)
    assert "config.pad_token_id" in repair.found and model.config.pad_token_id == tokenizer.convert_tokens_to_ids(
        "<|pad|>"
    )
    assert fix_pad_token(tokenizer, model) is None
    assert len(repair_log()) == 1


def test_good_pad_token_is_left_alone(repair_log):
    tokenizer = build_chat_tokenizer()
    assert fix_pad_token(tokenizer, build_tiny_llama(tokenizer)) is None
    assert tokenizer.pad_token == "<|pad|>" and repair_log() == []


def test_fix_pad_token_rejects_a_path():
    with pytest.raises(TypeError, match="load_tokenizer"):
        fix_pad_token("some/folder")
