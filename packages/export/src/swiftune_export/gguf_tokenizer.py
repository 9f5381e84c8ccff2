"""A model's tokenizer written as GGUF ``tokenizer.*`` metadata: byte-level BPE (GPT-2, SmolLM, Llama-3, Qwen2 style)
here, sentencepiece-style vocabularies (Llama 2, Mistral v0.1, Gemma, Phi-3-mini) in ``gguf_vocab_sentencepiece``.

The byte-level BPE vocabulary is read from the model folder's tokenizer.json (the vocabulary, which tokens are
special, the pre-tokenizer regex); merges, special token ids, add_bos/add_eos and the chat template come from gguf's
``SpecialVocab``, which is llama.cpp's own reading of tokenizer.json, tokenizer_config.json and chat_template.jinja.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from swiftune_export.gguf_vocab_sentencepiece import add_sentencepiece_vocab, is_sentencepiece_style

# llama.cpp names the pre-tokenizer (the regex that splits text before BPE) rather than storing it. These are
# the regexes of the families supported here; a Split regex not listed has no name llama.cpp would apply.
_PRE_TOKENIZER_REGEXES = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


def load_tokenizer_json(model_dir: Path) -> dict:
    """The folder's tokenizer.json.

    Raises:
        FileNotFoundError: no tokenizer.json (GGUF needs the vocabulary inside the file).
        ValueError: neither a byte-level BPE nor a sentencepiece-style tokenizer.
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"'{model_dir}' has no tokenizer.json; save the tokenizer there (tokenizer.save_pretrained) before "
            "writing GGUF, which embeds the vocabulary."
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if is_sentencepiece_style(data):
        return data
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            "GGUF export here supports byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2 style) and sentencepiece-style "
            f"BPE with byte fallback (Llama 2, Mistral, Gemma); this tokenizer.json is {model.get('type')} with a "
            f"{(data.get('decoder') or {}).get('type')} decoder. Convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    return data


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer.

    Raises:
        ValueError: a split regex llama.cpp would not reproduce (the GGUF would tokenize differently).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (
        pre.get("type") == "Sequence"
        and [p.get("type") for p in parts] == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"  # single digits split off, then GPT-2's regex (SmolLM, StarCoder)
    splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if pre.get("type") == "Sequence" and len(splits) == 1:
        regex = (splits[0].get("pattern") or {}).get("Regex")
        for name, known in _PRE_TOKENIZER_REGEXES.items():
            if regex == known:
                return name
    raise ValueError(
        "The tokenizer's pre-tokenizer is not one llama.cpp names (gpt-2, smollm, llama-bpe, qwen2); a GGUF of it "
        "would split text differently from the model's training; convert with llama.cpp's convert_hf_to_gguf.py."
    )


def token_list(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types, padded to the model's embedding rows with unused placeholders.

    Added tokens marked special are CONTROL (never produced by splitting text); other added tokens are
    USER_DEFINED (matched whole in text); the rest NORMAL.

    Raises:
        ValueError: the tokenizer has more tokens than the model has embedding rows, or holes in its ids.
    """
    by_id: dict[int, tuple[str, int]] = {
        index: (token, gguf.TokenType.NORMAL) for token, index in tokenizer_json["model"]["vocab"].items()
    }
    for added in tokenizer_json.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise ValueError(
            f"The tokenizer has token id {max(by_id)} but the model has only {vocab_size} embedding rows; resize the "
            "model's embeddings to the tokenizer before export."
        )
    tokens, types = [], []
    for index in range(vocab_size):
        token, kind = by_id.get(index, (f"[PAD{index}]", gguf.TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> list[str]:
    """Write the ``tokenizer.ggml.*`` keys and the chat template of the tokenizer in ``model_dir``; return the
    token list."""
    data = load_tokenizer_json(model_dir)
    if is_sentencepiece_style(data):
        return add_sentencepiece_vocab(writer, model_dir, data, vocab_size)
    tokens, types = token_list(data, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError(f"tokenizer.json in '{model_dir}' has no BPE merges; it cannot be written as GGUF.")
    # Say it explicitly when the tokenizer adds no BOS/EOS: readers otherwise fall back to per-model defaults.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    return tokens


def model_name(folder_name: str, tokens: list[str]) -> str:
    """The ``general.name`` to write: the folder's name, unless llama.cpp would read it as Phi-3's.

    llama.cpp sets token attributes by model name: a name containing "phi3" or "phi-3" makes it look up
    ``</s>``, ``<unk>``, ``<s>`` and ``<|endoftext|>`` in the vocabulary and fail to load when one is missing.
    """
    lowered = folder_name.lower()
    needed = {"</s>", "<unk>", "<s>", "<|endoftext|>"}
    if ("phi3" in lowered or "phi-3" in lowered) and not needed <= set(tokens):
        return "model"
    return folder_name
