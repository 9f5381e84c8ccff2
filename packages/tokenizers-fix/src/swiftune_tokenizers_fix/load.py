"""Loading a tokenizer folder, with the fast tokenizer checked against the sentencepiece model it was built from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from swiftune_tokenizers_fix.backend import replace_backend
from swiftune_tokenizers_fix.report import Repair, report
from swiftune_tokenizers_fix.sentencepiece_fast import sentencepiece_to_tokenizers

logger = logging.getLogger("swiftune_tokenizers_fix")

# Fixed text on which the fast and the sentencepiece tokenizers must agree: leading, doubled and trailing spaces,
# tabs and newlines (dummy prefix and whitespace clean-up), accents, CJK, Cyrillic and an emoji (normalization and
# byte fallback), digits, code and plain prose.
PROBE_TEXT = (
    "Hello world! The year 1742, naïve café — 你好, Привет. 🦊\n"
    "  Two  spaces\tand a tab, trailing space \n"
    "def square(x):\n    return x ** 2  # code\n"
    "The capital of France is Paris."
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | os.PathLike, check_sentencepiece: bool = True, **kwargs):
    """Load the fast tokenizer of a local folder; rebuild it from ``tokenizer.model`` when the two disagree.

    A ``tokenizer.json`` converted with an old or buggy converter (lost dummy prefix, no byte fallback, different
    whitespace handling) splits text differently from the sentencepiece model the weights were trained with. Both
    encode :data:`PROBE_TEXT`; on any difference the fast tokenizer is rebuilt from the sentencepiece model (see
    :func:`rebuild_from_sentencepiece`) and the repair is logged.

    Args:
        path: a local folder with ``tokenizer.json`` and/or ``tokenizer.model`` and ``tokenizer_config.json``.
        check_sentencepiece: compare with ``tokenizer.model`` when the folder has one.
        **kwargs: passed to ``AutoTokenizer.from_pretrained``.

    Returns:
        A fast (``TokenizersBackend``) tokenizer.

    Raises:
        FileNotFoundError: the folder does not exist or holds no tokenizer files.
        TypeError: transformers can only load a slow tokenizer for this folder.
    """
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"Tokenizer folder '{path}' does not exist; swiftune never downloads: copy the model folder to this "
            "machine and pass its path."
        )
    if folder.is_file():
        raise FileNotFoundError(f"'{path}' is a file; pass the folder that holds tokenizer.json and its config.")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"'{path}' holds no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}).")
    kwargs.setdefault("local_files_only", True)  # a folder is all there is: never reach for the hub
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"transformers loads '{path}' as the slow {type(tokenizer).__name__}; swiftune needs a fast tokenizer: "
            "save one (tokenizer.json) into the folder first."
        )
    if check_sentencepiece and (folder / "tokenizer.model").is_file():
        rebuild_from_sentencepiece(tokenizer, folder / "tokenizer.model")
    return tokenizer


def rebuild_from_sentencepiece(tokenizer, model_file: str | os.PathLike) -> Repair | None:
    """Rebuild the backend of a fast ``tokenizer`` from ``model_file`` when they encode the probe text differently.

    The added tokens (same ids and flags) and the post-processor (BOS/EOS insertion) of the fast tokenizer are kept;
    only the segmentation of text changes.

    Args:
        tokenizer: a fast tokenizer, changed in place.
        model_file: the sentencepiece ``tokenizer.model``; a file sentencepiece cannot read (Llama 3 keeps a
            tiktoken file under that name) means there is no slow tokenizer to compare with.

    Returns:
        The repair, or None when both agree or the file is not a sentencepiece model.

    Raises:
        ValueError: the rebuilt tokenizer still disagrees, or an added token cannot keep its id.
    """
    import sentencepiece

    try:
        slow = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as error:
        logger.debug("%s is not a sentencepiece model (%s); nothing to compare with.", model_file, error)
        return None
    expected = slow.encode(PROBE_TEXT)
    got = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if got == expected:
        return None
    at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    fast_pieces, slow_pieces = (
        tokenizer.convert_ids_to_tokens(got[at : at + 3]),
        slow.id_to_piece(expected[at : at + 3]),
    )
    backend = sentencepiece_to_tokenizers(model_file)
    _carry_added_tokens(tokenizer, backend)
    backend.post_processor = tokenizer.backend_tokenizer.post_processor
    if backend.encode(PROBE_TEXT, add_special_tokens=False).ids != expected:
        raise ValueError(
            f"The fast tokenizer disagrees with {model_file} and swiftune's rebuild does too; load with "
            "check_sentencepiece=False to keep tokenizer.json, or regenerate it from the sentencepiece model."
        )
    replace_backend(tokenizer, backend)
    return report(
        "sentencepiece",
        f"a fast tokenizer that splits the probe text differently from {Path(model_file).name} (from token {at}: "
        f"{fast_pieces} instead of {slow_pieces})",
        "rebuilt it from the sentencepiece model, keeping its added tokens and BOS/EOS insertion",
    )


def _carry_added_tokens(tokenizer, backend) -> None:
    """Register the fast tokenizer's added tokens on ``backend`` with the same ids and flags."""
    from tokenizers import AddedToken

    for token_id, token in sorted(tokenizer.added_tokens_decoder.items()):
        copy = AddedToken(
            token.content,
            single_word=token.single_word,
            lstrip=token.lstrip,
            rstrip=token.rstrip,
            normalized=token.normalized,
            special=token.special,
        )
        existing = backend.token_to_id(token.content)
        if existing is None and token_id != backend.get_vocab_size(with_added_tokens=True):
            existing = -1  # it would land on another id
        if existing not in (None, token_id):
            raise ValueError(
                f"The fast tokenizer's added token {token.content!r} has id {token_id}, which the sentencepiece model "
                "gives to another piece; swiftune cannot rebuild it. Load with check_sentencepiece=False."
            )
        (backend.add_special_tokens if token.special else backend.add_tokens)([copy])
        if backend.token_to_id(token.content) != token_id:
            raise ValueError(f"Rebuilding from sentencepiece moved added token {token.content!r} off id {token_id}.")
