"""A sentencepiece-style tokenizer (Llama 2, Mistral v0.1, Gemma 1-3, Phi-3-mini) written as GGUF ``tokenizer.*`` keys.

llama.cpp's "llama" tokenizer model (SPM) does not replay merge rules: it escapes spaces as ``▁``, optionally
prepends one, then repeatedly joins the adjacent pair whose joined text is a vocabulary token of the highest
*score* (leftmost on ties), and spells every leftover piece as byte tokens ``<0x00>``..``<0xFF>``. So the file needs
a score per token that orders merges as the model's own tokenizer does, and token types that tell bytes, the
unknown token, control tokens and user-defined tokens apart.

Everything is read from the Hugging Face tokenizer.json (the file write_gguf already requires): a BPE model with
``byte_fallback`` as the sentencepiece conversions write it. sentencepiece BPE has no merge list, it joins by piece
score, and the converted merge list is ranked by those scores, so a token's score here is minus the rank of the
first merge that makes it: llama.cpp then joins pairs in the same order as the tokenizer that wrote the file.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import gguf

SPIECE_UNDERLINE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# Scores of tokens that merging never produces (added tokens, padding), as llama.cpp's converter writes them.
_NOT_MERGED_SCORE = -1000.0


def is_sentencepiece_style(tokenizer_json: dict) -> bool:
    """Whether tokenizer.json holds a sentencepiece-style vocabulary (pieces with ``▁`` and byte fallback) rather
    than a byte-level BPE one."""
    model = tokenizer_json.get("model") or {}
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))


def add_space_prefix(tokenizer_json: dict) -> bool:
    """Whether the tokenizer puts a ``▁`` before the text (Llama 2, Mistral, Phi-3: yes; Gemma: no).

    llama.cpp's sentencepiece tokenizer only escapes spaces as ``▁`` and optionally prepends one; it does not strip,
    collapse or Unicode-normalize text. A tokenizer that does any of these would be split differently by it.

    Raises:
        ValueError: a normalizer or pre-tokenizer step llama.cpp would not reproduce.
    """
    escapes, prepends = False, False
    for step in _flatten(tokenizer_json.get("normalizer")):
        kind = step.get("type")
        if (
            kind == "Replace"
            and (step.get("pattern") or {}).get("String") == " "
            and step["content"] == SPIECE_UNDERLINE
        ):
            escapes = True
        elif kind == "Prepend" and step.get("prepend") == SPIECE_UNDERLINE:
            prepends = True
        else:
            raise _unreproducible(f"a {kind} normalizer")
    for step in _flatten(tokenizer_json.get("pre_tokenizer")):
        if step.get("type") != "Metaspace" or step.get("replacement") != SPIECE_UNDERLINE:
            raise _unreproducible(f"a {step.get('type')} pre-tokenizer")
        if step.get("split", False) and _has_inner_underline(tokenizer_json):
            raise _unreproducible("a Metaspace pre-tokenizer that splits at spaces while tokens span them")
        escapes = True
        scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
        prepends = prepends or scheme != "never"
    if not escapes:
        raise _unreproducible("no step that writes spaces as '\u2581'")
    return prepends


def sentencepiece_token_list(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens by id with llama.cpp's scores and token types, padded to the model's embedding rows.

    Byte pieces ``<0xXX>`` are BYTE, the model's unknown token UNKNOWN, added tokens marked special CONTROL and
    other added tokens USER_DEFINED (their ``▁`` written back as spaces, since llama.cpp matches them in raw text),
    the rest NORMAL; rows past the tokenizer are UNUSED ``[PAD<id>]`` placeholders.

    Raises:
        ValueError: not a BPE model with byte fallback, more tokens than embedding rows, or two tokens with the same
            text (llama.cpp refuses such a vocabulary).
    """
    model = tokenizer_json["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ValueError(
            f"This {model.get('type')} tokenizer cannot be written for llama.cpp's sentencepiece tokenizer, which "
            "joins pieces pairwise by score as sentencepiece BPE does (a Unigram vocabulary would be split "
            "differently); export models whose tokenizer.json is BPE with byte_fallback (Llama 2, Mistral, Gemma)."
        )
    scores = _merge_scores(model)
    # Below every merged token: a token no merge makes should be the last llama.cpp would join.
    unmerged = float(-len(model.get("merges") or []) - 1)
    by_id: dict[int, tuple[str, float, int]] = {}
    for piece, index in model["vocab"].items():
        if _BYTE_PIECE.fullmatch(piece):
            by_id[index] = (piece, 0.0, gguf.TokenType.BYTE)
        elif piece == model.get("unk_token"):
            by_id[index] = (piece, 0.0, gguf.TokenType.UNKNOWN)
        else:
            by_id[index] = (piece, scores.get(piece, 0.0 if len(piece) == 1 else unmerged), gguf.TokenType.NORMAL)
    for added in tokenizer_json.get("added_tokens", []):
        content, index = added["content"], added["id"]
        if by_id.get(index, (None, 0.0, None))[2] == gguf.TokenType.UNKNOWN:
            continue  # the unknown token is listed as added too; llama.cpp needs it typed UNKNOWN
        if added.get("special"):
            by_id[index] = (content, _NOT_MERGED_SCORE, gguf.TokenType.CONTROL)
        else:
            by_id[index] = (content.replace(SPIECE_UNDERLINE, " "), _NOT_MERGED_SCORE, gguf.TokenType.USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise ValueError(
            f"The tokenizer has token id {max(by_id)} but the model has only {vocab_size} embedding rows; resize the "
            "model's embeddings to the tokenizer before export."
        )
    tokens, token_scores, types = [], [], []
    for index in range(vocab_size):
        token, score, kind = by_id.get(index, (f"[PAD{index}]", _NOT_MERGED_SCORE, gguf.TokenType.UNUSED))
        tokens.append(token)
        token_scores.append(score)
        types.append(int(kind))
    duplicates = [token for token, count in Counter(tokens).items() if count > 1]
    if duplicates:
        duplicate = duplicates[0]
        raise ValueError(
            f"The token {duplicate!r} appears twice in the vocabulary (llama.cpp requires unique token texts); rename "
            "or remove the duplicate added token before export."
        )
    return tokens, token_scores, types


def add_sentencepiece_vocab(
    writer: gguf.GGUFWriter, tokenizer_dir: Path, tokenizer_json: dict, vocab_size: int
) -> list[str]:
    """Write the ``tokenizer.ggml.*`` keys of a sentencepiece-style tokenizer and its chat template; return the
    token list.

    Special token ids, add_bos/add_eos and the chat template come from gguf's ``SpecialVocab`` (llama.cpp's own
    reading of tokenizer.json, tokenizer_config.json and chat_template.jinja).
    """
    tokens, scores, types = sentencepiece_token_list(tokenizer_json, vocab_size)
    prefix = add_space_prefix(tokenizer_json)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # llama.cpp assumes a prefix space for this tokenizer model unless told otherwise (Gemma needs "otherwise").
    writer.add_add_space_prefix(prefix)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=False, n_vocab=vocab_size)
    # llama.cpp adds BOS by default for this tokenizer model: say explicitly what the tokenizer does.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    return tokens


def _merge_scores(model: dict) -> dict[str, float]:
    """Minus the rank of the first merge that makes each token: higher scores join first, as merge ranks do."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, float(-rank))
    return scores


def _flatten(step: dict | None) -> list[dict]:
    if not step:
        return []
    if step.get("type") == "Sequence":
        inner = step.get("normalizers") or step.get("pretokenizers") or []
        return [leaf for part in inner for leaf in _flatten(part)]
    return [step]


def _has_inner_underline(tokenizer_json: dict) -> bool:
    return any(SPIECE_UNDERLINE in piece[1:] for piece in tokenizer_json["model"]["vocab"])


def _unreproducible(what: str) -> ValueError:
    return ValueError(
        f"This sentencepiece-style tokenizer has {what}, which llama.cpp's sentencepiece tokenizer does not apply, so "
        "a GGUF of it would split text differently from the model's training; keep the tokenizer's normalizer to "
        "escaping spaces as '\u2581' (and an optional '\u2581' prefix), as Llama 2, Mistral and Gemma have."
    )
