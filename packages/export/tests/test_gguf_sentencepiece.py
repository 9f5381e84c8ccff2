"""Sentencepiece-style tokenizers (Llama 2 and Gemma shapes) written into GGUF, read back by llama.cpp and transformers.

The tokenizers are trained here with sentencepiece on a few lines of text, with byte fallback, and wrapped as the
Hugging Face fast tokenizer that a model folder holds; that fast tokenizer is the reference, itself checked against
sentencepiece. llama.cpp (llama-cpp-python, vocab only) must give the same ids and decode them back.
"""

import ctypes
import json

import gguf
import pytest
import sentencepiece
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from swiftune_export import gguf_vocab_sentencepiece, write_gguf
from swiftune_loader.testing import tiny_config
from swiftune_tokenizers_fix.sentencepiece_fast import sentencepiece_to_tokenizers
from swiftune_tokenizers_fix.testing import add_bos_on_encode, build_sentencepiece_folder

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizer!",
    "Numbers like 12 and 345 appear here.",
    "A second line\nwith a newline.",
    "Sentencepiece merges pieces by score.",
    "spaces  and   runs of them",
]
# Spaces (leading, doubled), a newline, digits, and characters the tiny vocabulary lacks (byte fallback).
PLAIN_TEXTS = [
    "Hello world",
    "  two  spaces",
    "line one\nline two",
    "digits 12345 and 3.14",
    "unicode café ñ 日本語 🙂",
    "The lazy fox merges by score",
    # Words the corpus lacks, made of its pieces, that end differently when pairs are joined in another order.
    "other hers therefore",
]
EXTRA_ROWS = 3  # embedding rows past the tokenizer, as models padded to a multiple have
CHAT_TEMPLATE = "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"

# Llama 2 / Mistral: "<s>" and "</s>", a "▁" prefix; Gemma: "<bos>" and "<eos>", no prefix, chat control tokens.
STYLES = {
    "llama": dict(
        spm=dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True),
        specials=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
        config=dict(model_type="llama"),
        texts_with_added_tokens=["a<mask>b", "x <mask> y"],
    ),
    "gemma": dict(
        spm=dict(
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            add_dummy_prefix=False,
            control_symbols=["<start_of_turn>", "<end_of_turn>"],
        ),
        specials=dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"),
        # gemma2: transformers' GGUF loader reads it (not "gemma"); llama.cpp scales queries by 1/sqrt(head_dim).
        config=dict(model_type="gemma2", query_pre_attn_scalar=16),
        texts_with_added_tokens=["a<mask>b", "<start_of_turn>user\nHi there<end_of_turn>"],
    ),
}


def _train_tokenizer(folder, style):
    """A sentencepiece BPE model with byte fallback and no text normalization (as Llama 2 and Gemma have), and the
    fast tokenizer that encodes like it (BOS added)."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=["<mask>"],
        minloglevel=2,
        **STYLES[style]["spm"],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_to_tokenizers(folder / "tokenizer.model"), **STYLES[style]["specials"]
    )
    fast.chat_template = CHAT_TEMPLATE
    return add_bos_on_encode(fast)


def _build_folder(root, style):
    root.mkdir()
    tokenizer = _train_tokenizer(root, style)
    fields = dict(STYLES[style]["config"])
    config = tiny_config(
        fields.pop("model_type"),
        vocab_size=len(tokenizer) + EXTRA_ROWS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        **fields,
    )
    folder = root / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per style: (style, model folder, its GGUF file, the folder's tokenizer as transformers loads it, the
    sentencepiece model)."""
    built = {}
    for style in STYLES:
        root = tmp_path_factory.mktemp("sentencepiece") / style
        folder = _build_folder(root, style)
        # A folder of its own: transformers' GGUF loader would pick up a tokenizer.model lying beside the file.
        out = write_gguf(folder, root / "gguf" / "model-f32.gguf", quant="f32")
        processor = sentencepiece.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
        built[style] = (style, folder, out, AutoTokenizer.from_pretrained(folder), processor)
    return built


@pytest.fixture(params=sorted(STYLES))
def exported(request, exports):
    return exports[request.param]


def _llama_cpp_detokenize(llm, ids):
    """llama.cpp's own detokenizer (llama-cpp-python's wrapper re-adds spacing rules of its own)."""
    import llama_cpp

    array = (llama_cpp.llama_token * len(ids))(*ids)
    buffer = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_detokenize(llm._model.vocab, array, len(ids), buffer, len(buffer), False, False)
    assert n >= 0, "detokenize buffer too small"
    return buffer.raw[:n].decode("utf-8", errors="replace")


def llama_cpp_disagreements(gguf_file, hf_tokenizer, plain_texts, texts_with_added_tokens=()):
    """Where llama.cpp, reading only the GGUF vocabulary, disagrees with the Hugging Face tokenizer: ids of every text
    (BOS/EOS as each adds them, added tokens parsed), and decoding the text's ids back to the text."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    try:
        problems = []
        for text in [*plain_texts, *texts_with_added_tokens]:
            expected = hf_tokenizer(text)["input_ids"]
            got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            if got != expected:
                problems.append(f"{text!r}: llama.cpp ids {got}, transformers {expected}")
        specials = set(hf_tokenizer.all_special_ids)
        for text in plain_texts:
            body = [i for i in hf_tokenizer(text)["input_ids"] if i not in specials]
            decoded = _llama_cpp_detokenize(llm, body)
            if decoded != text:
                problems.append(f"{text!r}: llama.cpp decodes its ids to {decoded!r}")
        return problems
    finally:
        llm.close()


def test_llama_cpp_tokenizes_and_decodes_like_transformers(exported):
    style, _, out, tokenizer, processor = exported
    for text in PLAIN_TEXTS:  # the reference itself: the fast tokenizer encodes as sentencepiece does
        assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id, *processor.encode(text)]
    unicode_ids = tokenizer(PLAIN_TEXTS[4])["input_ids"]
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in unicode_ids)  # byte fallback is used
    assert llama_cpp_disagreements(out, tokenizer, PLAIN_TEXTS, STYLES[style]["texts_with_added_tokens"]) == []


def test_gguf_vocabulary_metadata(exported):
    """Token types, padding rows, space prefix, special ids and chat template as llama.cpp's loader reads them."""
    style, folder, out, tokenizer, _ = exported
    reader = gguf.GGUFReader(out)
    field = {key: reader.fields[key].contents() for key in reader.fields if key.startswith("tokenizer.")}
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    tokens, types = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.token_type"]
    assert field["tokenizer.ggml.model"] == "llama"
    assert len(tokens) == len(types) == len(field["tokenizer.ggml.scores"]) == rows == len(tokenizer) + EXTRA_ROWS
    T = gguf.TokenType
    assert types[tokens.index("<0x0A>")] == T.BYTE and [t for t in types if t == T.BYTE] == [T.BYTE] * 256
    assert types[tokenizer.unk_token_id] == T.UNKNOWN
    assert types[tokenizer.bos_token_id] == types[tokenizer.eos_token_id] == T.CONTROL
    assert types[tokens.index("<mask>")] == T.USER_DEFINED
    assert types[-EXTRA_ROWS:] == [T.UNUSED] * EXTRA_ROWS
    assert field["tokenizer.ggml.add_space_prefix"] is (style == "llama")
    assert field["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert field["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert field["tokenizer.ggml.add_bos_token"] is True and field["tokenizer.ggml.add_eos_token"] is False
    assert field["tokenizer.chat_template"] == CHAT_TEMPLATE
    if style == "gemma":
        assert types[tokens.index("<start_of_turn>")] == T.CONTROL
        assert field["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id


def test_transformers_gguf_loader_reads_the_vocabulary_back(exported):
    style, folder, out, tokenizer, _ = exported
    loaded = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    vocabulary = loaded.get_vocab()
    assert {token: vocabulary.get(token) for token in tokenizer.get_vocab()} == tokenizer.get_vocab()
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(loaded, role) == getattr(tokenizer, role)
    assert loaded.chat_template == CHAT_TEMPLATE
    # transformers rebuilds a Llama-style tokenizer with a Metaspace pre-tokenizer, which adds no '▁' before text
    # that starts with a space (the file cannot say which a model wants, its GGUF docs note); other text must agree.
    for text in [text for text in PLAIN_TEXTS if not text.startswith(" ")]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def _plant(monkeypatch, change):
    """Make the exporter write a changed vocabulary: ``change(tokens, scores, types)`` edits the lists in place."""
    original = gguf_vocab_sentencepiece.sentencepiece_token_list

    def planted(tokenizer_json, vocab_size):
        tokens, scores, types = original(tokenizer_json, vocab_size)
        change(tokens, scores, types)
        return tokens, scores, types

    monkeypatch.setattr(gguf_vocab_sentencepiece, "sentencepiece_token_list", planted)


def _bytes_typed_normal(tokens, scores, types):
    types[:] = [int(gguf.TokenType.NORMAL) if t == gguf.TokenType.BYTE else t for t in types]


def _scores_dropped(tokens, scores, types):
    scores[:] = [0.0] * len(scores)


@pytest.mark.parametrize("mistake", [_bytes_typed_normal, _scores_dropped])
def test_a_planted_mistake_is_caught(exported, tmp_path, monkeypatch, mistake):
    """Byte tokens typed NORMAL decode as '<0xC3>' text; without scores llama.cpp joins pairs left to right."""
    style, folder, _, tokenizer, _ = exported
    _plant(monkeypatch, mistake)
    out = write_gguf(folder, tmp_path / "planted.gguf", quant="f32")
    assert llama_cpp_disagreements(out, tokenizer, PLAIN_TEXTS) != []


def test_add_eos_flag_reaches_llama_cpp(exported, tmp_path):
    """A tokenizer that appends EOS says so in the file, and llama.cpp then appends it too."""
    style, folder, _, tokenizer, _ = exported
    data = json.loads((folder / "tokenizer.json").read_text())
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": eos, "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            bos: {"id": bos, "ids": [tokenizer.bos_token_id], "tokens": [bos]},
            eos: {"id": eos, "ids": [tokenizer.eos_token_id], "tokens": [eos]},
        },
    }
    changed = tmp_path / "tokenizer"
    changed.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (folder / name).is_file():
            (changed / name).write_text((folder / name).read_text())
    (changed / "tokenizer.json").write_text(json.dumps(data))
    with_eos = AutoTokenizer.from_pretrained(changed)
    assert with_eos("Hello world")["input_ids"][-1] == tokenizer.eos_token_id
    out = write_gguf(folder, tmp_path / "eos.gguf", quant="f32", tokenizer_dir=changed)
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.add_eos_token"].contents() is True
    assert llama_cpp_disagreements(out, with_eos, PLAIN_TEXTS[:3]) == []


def test_tokenizers_llama_cpp_would_split_differently_are_refused(exports, tmp_path):
    """Unigram vocabularies (llama.cpp would join pieces by score, not search the best split) and normalizers that
    strip or collapse spaces are refused with a message, and no file is left."""
    _, folder, _, _, _ = exports["llama"]
    unigram = build_sentencepiece_folder(tmp_path / "unigram", model_type="unigram")
    with pytest.raises(ValueError, match="Unigram"):
        write_gguf(folder, tmp_path / "a.gguf", tokenizer_dir=unigram)
    collapsing = build_sentencepiece_folder(tmp_path / "bpe", model_type="bpe")  # sentencepiece's default cleanup
    with pytest.raises(ValueError, match="split text differently"):
        write_gguf(folder, tmp_path / "a.gguf", tokenizer_dir=collapsing)
    assert not list(tmp_path.glob("*.gguf"))


def test_space_prefix_is_read_from_either_spelling_of_the_normalization():
    """Older conversions prepend '▁' in the normalizer, newer ones in a Metaspace pre-tokenizer; both say 'prefix'."""
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    prepend = {"type": "Prepend", "prepend": "\u2581"}
    vocab = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {"\u2581a": 0, "b": 1}}}

    def metaspace(scheme, split=False):
        return {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": split}

    prefix = gguf_vocab_sentencepiece.add_space_prefix
    assert prefix(dict(vocab, normalizer={"type": "Sequence", "normalizers": [prepend, replace]})) is True
    assert prefix(dict(vocab, normalizer=replace)) is False  # Gemma
    assert prefix(dict(vocab, pre_tokenizer=metaspace("first"))) is True
    assert prefix(dict(vocab, pre_tokenizer=metaspace("never"))) is False
    assert prefix(dict(vocab, pre_tokenizer=metaspace("first", split=True))) is True  # no token spans a space
    spanning = {"model": dict(vocab["model"], vocab={"a\u2581b": 0})}
    with pytest.raises(ValueError, match="split text differently"):
        prefix(dict(spanning, pre_tokenizer=metaspace("first", split=True)))
    with pytest.raises(ValueError, match="NFKC normalizer"):
        prefix(dict(vocab, normalizer={"type": "Sequence", "normalizers": [{"type": "NFKC"}, replace]}))
    with pytest.raises(ValueError, match="no step that writes spaces"):
        prefix(vocab)


def test_duplicate_token_texts_are_refused():
    """llama.cpp aborts on a vocabulary with two equal token texts; an added token spelled with '▁' becomes one."""
    data = {
        "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>", "vocab": {"<unk>": 0, "a b": 1}},
        "added_tokens": [{"id": 2, "content": "a\u2581b", "special": False}],
    }
    with pytest.raises(ValueError, match="appears twice"):
        gguf_vocab_sentencepiece.sentencepiece_token_list(data, 3)
