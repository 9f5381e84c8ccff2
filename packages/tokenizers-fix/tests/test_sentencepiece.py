"""load_tokenizer compares the fast tokenizer with the sentencepiece model and rebuilds it when they disagree."""

import json

import pytest
import sentencepiece

from swiftune_tokenizers_fix import PROBE_TEXT, load_tokenizer, sentencepiece_to_tokenizers
from swiftune_tokenizers_fix.testing import build_sentencepiece_folder

TEXTS = [PROBE_TEXT, "", "  leading and   inner spaces ", "Quillhaven, 1742.\n\nÉlan ﬁ ① 🦊"]


def _encode_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize("remove_extra_whitespaces", [True, False])
@pytest.mark.parametrize("add_dummy_prefix", [True, False])
def test_converter_encodes_like_sentencepiece(tmp_path, model_type, remove_extra_whitespaces, add_dummy_prefix):
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["The quick brown fox jumps over the lazy dog.", "Quillhaven, 1742:  a  town."] * 20),
        model_prefix=str(tmp_path / "m"),
        model_type=model_type,
        vocab_size=330,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        remove_extra_whitespaces=remove_extra_whitespaces,
        add_dummy_prefix=add_dummy_prefix,
        user_defined_symbols=["<|im_start|>"],
        minloglevel=2,
    )
    slow = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    fast = sentencepiece_to_tokenizers(tmp_path / "m.model")
    for text in TEXTS:
        ids = fast.encode(text).ids
        assert ids == slow.encode(text), text
        assert fast.decode(ids) == slow.decode(ids)


def test_matching_fast_tokenizer_is_loaded_unchanged(tmp_path, repair_log):
    folder = build_sentencepiece_folder(tmp_path / "tok")
    before = (folder / "tokenizer.json").read_text()
    tokenizer = load_tokenizer(folder)
    slow = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert tokenizer.is_fast and _encode_ids(tokenizer, PROBE_TEXT) == slow.encode(PROBE_TEXT)
    assert tokenizer.backend_tokenizer.to_str() == type(tokenizer.backend_tokenizer).from_str(before).to_str()
    assert repair_log() == []


def test_fast_tokenizer_that_lost_the_dummy_prefix_is_rebuilt(tmp_path, repair_log):
    from transformers import AutoTokenizer

    folder = build_sentencepiece_folder(tmp_path / "tok")
    # The classic conversion bug: the normalizer no longer prepends "▁", so every first word splits differently.
    state = json.loads((folder / "tokenizer.json").read_text())
    state["normalizer"]["normalizers"] = [n for n in state["normalizer"]["normalizers"] if n["type"] != "Prepend"]
    (folder / "tokenizer.json").write_text(json.dumps(state))
    slow = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    broken = AutoTokenizer.from_pretrained(folder)
    assert _encode_ids(broken, PROBE_TEXT) != slow.encode(PROBE_TEXT)  # the defect is planted

    tokenizer = load_tokenizer(folder)

    (line,) = repair_log()
    assert line.startswith("sentencepiece: found a fast tokenizer that splits the probe text differently")
    for text in TEXTS:
        assert _encode_ids(tokenizer, text) == slow.encode(text)
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id == 1  # BOS insertion kept
    assert tokenizer.decode(tokenizer("Hello  world")["input_ids"], skip_special_tokens=True) == "Hello world"
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert _encode_ids(reloaded, PROBE_TEXT) == slow.encode(PROBE_TEXT)


def test_rebuild_keeps_added_tokens_and_their_ids(tmp_path, repair_log):
    from transformers import AutoTokenizer

    folder = build_sentencepiece_folder(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["normalizer"]["normalizers"] = [n for n in state["normalizer"]["normalizers"] if n["type"] != "Prepend"]
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(state))

    tokenizer = load_tokenizer(folder)

    assert len(repair_log()) == 1
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == ids
    assert _encode_ids(tokenizer, "<|im_start|>user")[0] == ids[0]


def test_transformers_own_conversion_of_a_bare_tokenizer_model_is_checked(tmp_path):
    # transformers 5 builds the fast tokenizer itself when a folder only has tokenizer.model; whatever it builds,
    # what load_tokenizer returns must split text like sentencepiece does.
    source = build_sentencepiece_folder(tmp_path / "tok")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.model").write_bytes((source / "tokenizer.model").read_bytes())
    slow = sentencepiece.SentencePieceProcessor(model_file=str(bare / "tokenizer.model"))
    tokenizer = load_tokenizer(bare)
    for text in TEXTS:
        assert _encode_ids(tokenizer, text) == slow.encode(text)


def test_a_tokenizer_model_that_is_not_sentencepiece_is_ignored(tmp_path, repair_log):
    folder = build_sentencepiece_folder(tmp_path / "tok")
    (folder / "tokenizer.model").write_bytes(b"IHRoZQ== 0\nIGE= 1\n")  # a tiktoken file, as Llama 3 ships
    tokenizer = load_tokenizer(folder)
    assert tokenizer.is_fast and repair_log() == []


def test_load_tokenizer_says_what_to_do_with_a_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_tokenizer(tmp_path / "file.txt")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
