"""Special-token attributes whose strings and ids disagree with the vocabulary, or with the model's configs."""

import json

import pytest

from swiftune_tokenizers_fix import fix_special_tokens
from swiftune_tokenizers_fix.backend import replace_backend
from swiftune_tokenizers_fix.testing import build_chat_tokenizer, build_tiny_llama


def _saved_with_eos(tmp_path, eos):
    """A tokenizer folder whose tokenizer_config.json names ``eos`` as EOS (a config copied from another model)."""
    build_chat_tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = eos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_eos_not_in_the_vocabulary_takes_the_model_configs_eos(tmp_path, repair_log):
    from transformers import AutoTokenizer

    model = build_tiny_llama(build_chat_tokenizer())  # its config says eos_token_id 2, <|im_end|>
    tokenizer = AutoTokenizer.from_pretrained(_saved_with_eos(tmp_path, "</s>"))
    # transformers appends the unknown string as a new token: an id the model has no embedding row for.
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == 384 == model.config.vocab_size

    repair = fix_special_tokens(tokenizer, model)

    assert "eos_token '</s>' with id 384, beyond 384 embedding rows" in repair.found
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert "</s>" not in tokenizer.get_vocab() and len(tokenizer) == 384  # the stray token is gone
    assert repair_log() == [str(repair)]


def test_eos_not_in_the_vocabulary_takes_the_token_that_ends_a_chat_turn(repair_log):
    tokenizer = build_chat_tokenizer()
    tokenizer.eos_token = "</s>"  # not in the vocabulary: it encodes as the unknown token
    tokenizer.sep_token = "[SEP]"
    assert tokenizer.eos_token_id == tokenizer.sep_token_id == tokenizer.unk_token_id

    repair = fix_special_tokens(tokenizer)

    assert "eos_token '</s>' not in the vocabulary" in repair.found and "chat template" in repair.did
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert "sep_token '[SEP]' not in the vocabulary" in repair.found and tokenizer.sep_token is None
    assert len(repair_log()) == 1


def test_special_token_split_into_pieces_is_registered_with_its_id(repair_log):
    tokenizer = build_chat_tokenizer()
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] != "<|im_end|>"]
    replace_backend(tokenizer, type(tokenizer.backend_tokenizer).from_str(json.dumps(state)))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2  # still in the vocabulary...
    assert len(tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1  # ...but text never reaches it

    repair = fix_special_tokens(tokenizer)

    assert "split into pieces" in repair.found
    assert tokenizer("hi<|im_end|>", add_special_tokens=False)["input_ids"][-1] == 2
    assert len(tokenizer) == 384 and len(repair_log()) == 1


def test_model_configs_that_disagree_with_the_tokenizer_are_updated(repair_log):
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    model.generation_config.eos_token_id = 0  # a base model's end-of-document token: chats would never stop
    model.config.bos_token_id = 5

    repair = fix_special_tokens(tokenizer, model)

    assert "generation_config.eos_token_id 0" in repair.found and "config.bos_token_id 5" in repair.found
    assert model.generation_config.eos_token_id == [2, 0] and model.config.bos_token_id == 0
    assert fix_special_tokens(tokenizer, model) is None
    assert len(repair_log()) == 1


def test_consistent_tokenizer_and_model_are_left_alone(repair_log):
    tokenizer = build_chat_tokenizer()
    before = tokenizer.backend_tokenizer.to_str()
    assert fix_special_tokens(tokenizer, build_tiny_llama(tokenizer)) is None
    assert tokenizer.backend_tokenizer.to_str() == before and repair_log() == []


def test_eos_that_nothing_can_replace_is_an_error_saying_what_to_set():
    tokenizer = build_chat_tokenizer()
    tokenizer.chat_template = None
    tokenizer.eos_token = "</s>"
    with pytest.raises(ValueError, match="Set tokenizer.eos_token"):
        fix_special_tokens(tokenizer)
