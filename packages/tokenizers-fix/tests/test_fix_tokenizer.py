"""fix_tokenizer runs every tokenizer repair in order, reports each in one line, and leaves a sound tokenizer alone."""

import pytest

from swiftune_tokenizers_fix import Repair, fix_tokenizer
from swiftune_tokenizers_fix.testing import CHATML_TEMPLATE, add_bos_on_encode, build_chat_tokenizer, build_tiny_llama


def test_sound_tokenizer_and_model_come_back_unchanged(repair_log):
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    backend, config = tokenizer.backend_tokenizer.to_str(), model.config.to_dict()

    same, repairs = fix_tokenizer(tokenizer, model)

    assert same is tokenizer and repairs == [] and repair_log() == []
    assert tokenizer.backend_tokenizer.to_str() == backend and tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.padding_side == "right" and model.config.to_dict() == config


def test_every_defect_at_once_is_repaired_in_order_and_a_second_pass_finds_nothing(repair_log):
    tokenizer = add_bos_on_encode(build_chat_tokenizer(pad_token=None))
    tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE[: CHATML_TEMPLATE.index("{% if")]
    tokenizer.padding_side = "left"
    model = build_tiny_llama(tokenizer)

    _, repairs = fix_tokenizer(tokenizer, model)

    assert [r.kind for r in repairs] == [
        "pad_token",
        "padding_side",
        "generation_prompt",
        "double_bos",
        "embedding_size",
    ]
    assert all(isinstance(r, Repair) for r in repairs)
    assert repair_log() == [str(r) for r in repairs]  # one line each
    assert tokenizer.pad_token_id == 384 == model.config.pad_token_id and model.config.vocab_size == 385
    assert tokenizer.padding_side == "right"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n") and tokenizer(text)["input_ids"].count(tokenizer.bos_token_id) == 1
    assert fix_tokenizer(tokenizer, model)[1] == []


def test_generation_padding_is_an_option():
    _, repairs = fix_tokenizer(build_chat_tokenizer(), padding_side="left")
    assert [r.kind for r in repairs] == ["padding_side"]


def test_bad_arguments_say_what_to_pass(tmp_path):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    from swiftune_tokenizers_fix.testing import build_sentencepiece_folder

    with pytest.raises(TypeError, match="load_tokenizer"):
        fix_tokenizer(str(tmp_path))
    slow = SentencePieceBackend(vocab_file=str(build_sentencepiece_folder(tmp_path / "sp") / "tokenizer.model"))
    with pytest.raises(TypeError, match="needs a fast tokenizer"):
        fix_tokenizer(slow)
    with pytest.raises(TypeError, match="transformers model"):
        fix_tokenizer(build_chat_tokenizer(), model=object())
