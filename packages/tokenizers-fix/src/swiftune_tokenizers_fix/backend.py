"""Edits of the `tokenizers` backend that transformers' tokenizer API does not offer.

transformers keeps the vocabulary, added tokens and post-processor in a Rust ``tokenizers.Tokenizer``; removing an
added token or one entry of a post-processor template is only possible by editing its JSON form and swapping the
result in. The transformers tokenizer reads everything else (added tokens, special-token ids) back from the backend,
so a swap keeps the wrapper consistent.
"""

from __future__ import annotations

import json


def replace_backend(tokenizer, backend) -> None:
    """Make ``backend`` (a ``tokenizers.Tokenizer``) the backend of the transformers ``tokenizer``, in place."""
    backend.encode_special_tokens = tokenizer.backend_tokenizer.encode_special_tokens
    # TokenizersBackend has no setter for its backend; every accessor reads this attribute.
    object.__setattr__(tokenizer, "_tokenizer", backend)


def drop_trailing_added_tokens(tokenizer, contents: set[str]) -> list[int]:
    """Remove the added tokens named in ``contents`` that sit at the end of the id range.

    Only tokens above every other id are removed: removing one in the middle would renumber the tokens after it.

    Returns:
        The ids removed, highest first.
    """
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    base_size = backend.get_vocab_size(with_added_tokens=False)
    by_id = {index: str(token) for index, token in tokenizer.added_tokens_decoder.items()}
    top = max(tokenizer.get_vocab().values())
    dropped = []
    while top >= base_size and by_id.get(top) in contents:
        dropped.append(top)
        top -= 1
    if dropped:
        state = json.loads(backend.to_str())
        state["added_tokens"] = [token for token in state["added_tokens"] if token["id"] not in dropped]
        replace_backend(tokenizer, Tokenizer.from_str(json.dumps(state)))
    return dropped


def remove_special_token_from_post_processor(tokenizer, token: str) -> bool:
    """Stop the post-processor from inserting ``token`` (e.g. BOS) when text is encoded with special tokens.

    Handles ``TemplateProcessing`` alone or inside a ``Sequence`` (Llama 3 pairs it with ``ByteLevel``); the other
    parts of the post-processor are kept as they are.

    Returns:
        True when the token was removed, False when the post-processor does not insert it.

    Raises:
        ValueError: a post-processor kind that inserts tokens in a fixed layout (Bert, Roberta) cannot be edited.
    """
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    processor = state.get("post_processor")
    if processor is None or not _strip_token(processor, token):
        return False
    # Only the post-processor is needed from the edited JSON: rebuild it on an empty model instead of the vocabulary.
    minimal = {key: None for key in ("truncation", "padding", "normalizer", "pre_tokenizer", "decoder")}
    minimal.update(
        version="1.0", added_tokens=[], post_processor=processor, model={"type": "BPE", "vocab": {}, "merges": []}
    )
    tokenizer.backend_tokenizer.post_processor = Tokenizer.from_str(json.dumps(minimal)).post_processor
    return True


def _strip_token(processor: dict, token: str) -> bool:
    kind = processor.get("type")
    if kind == "Sequence":
        return any([_strip_token(part, token) for part in processor["processors"]])
    if kind == "TemplateProcessing":
        removed = False
        for key in ("single", "pair"):
            kept = [piece for piece in processor[key] if piece.get("SpecialToken", {}).get("id") != token]
            removed |= len(kept) != len(processor[key])
            processor[key] = kept
        if removed:
            processor["special_tokens"].pop(token, None)
        return removed
    if kind in ("BertProcessing", "RobertaProcessing") and token in (processor["cls"][0], processor["sep"][0]):
        raise ValueError(
            f"The tokenizer's {kind} post-processor always inserts its special tokens; swiftune cannot remove "
            f"{token!r} from it. Encode chat text with add_special_tokens=False instead."
        )
    return False
