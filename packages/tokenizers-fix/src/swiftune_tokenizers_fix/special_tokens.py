"""Special-token attributes (bos, eos, unk, ...) whose strings and ids disagree with the vocabulary or the model."""

from __future__ import annotations

from swiftune_tokenizers_fix._validate import embedding_rows, model_configs, require_fast_tokenizer, require_model
from swiftune_tokenizers_fix.backend import drop_trailing_added_tokens
from swiftune_tokenizers_fix.chat_template import end_of_turn_token
from swiftune_tokenizers_fix.report import Repair, report

# The pad token has its own repair (pad_token.py): it may legitimately need a new token.
SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token")


def fix_special_tokens(tokenizer, model=None) -> Repair | None:
    """Make every special-token attribute name a token of the vocabulary that encodes as that one id.

    Three defects are repaired:

    - an attribute names a string that is not in the vocabulary (or, with a model, whose id has no embedding row):
      it is pointed at the token the model's config names for that role, for EOS else at the token the chat template
      ends a reply with; other roles with no candidate are unset. An added token left over from the bad string
      (transformers appends one when loading such a config) is removed when it is the last id;
    - an attribute names a vocabulary entry that is not registered as a special token, so text containing it is
      split into pieces: it is registered, keeping its id;
    - with a model, its ``config`` / ``generation_config`` disagree with the tokenizer's BOS, or do not stop on the
      tokenizer's EOS: BOS is copied, and the tokenizer's EOS is added to the ids that stop generation.

    Args:
        tokenizer: a fast tokenizer, changed in place.
        model: optional; gives candidate ids and embedding rows, and has its configs updated.

    Returns:
        The repair, or None when nothing disagreed.

    Raises:
        ValueError: EOS is unusable and nothing names a replacement; the message says how to set it.
    """
    from tokenizers import AddedToken

    require_fast_tokenizer(tokenizer, "fix_special_tokens")
    if model is not None:
        require_model(model, "fix_special_tokens")
    limit = embedding_rows(model) if model is not None else None
    found, did, abandoned = [], [], set()
    for role in SPECIAL_TOKEN_ROLES:
        vocab = tokenizer.get_vocab()
        token = getattr(tokenizer, role)
        if token is None:
            continue
        token_id = vocab.get(token)
        if token_id is None or (limit is not None and token_id >= limit):
            replacement, source = _replacement(tokenizer, role, vocab, model, limit)
            if replacement is None and token_id is not None:
                continue  # a real token beyond the embeddings: the embedding-size repair grows the model for it
            found.append(
                f"{role} {token!r} "
                + (
                    "not in the vocabulary"
                    if token_id is None
                    else f"with id {token_id}, beyond {limit} embedding rows"
                )
            )
            if replacement is None and role == "eos_token":
                raise ValueError(
                    f"The tokenizer's eos_token {token!r} is not in its vocabulary, and neither the model's config nor "
                    "the chat template names one that is. Set tokenizer.eos_token to the token that ends an "
                    "assistant turn (for ChatML '<|im_end|>') before fine-tuning."
                )
            setattr(tokenizer, role, replacement)
            did.append(
                f"{role} -> {replacement!r}" + (f" (id {vocab[replacement]}, from {source})" if replacement else "")
            )
            if token_id is not None:
                abandoned.add(token)
        elif tokenizer(token, add_special_tokens=False)["input_ids"] != [token_id]:
            found.append(f"{role} {token!r} (id {token_id}) split into pieces when it occurs in text")
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
            did.append(f"registered {token!r} as a special token with its id {token_id}")
    still_used = {str(t) for t in tokenizer.all_special_tokens}
    dropped = drop_trailing_added_tokens(tokenizer, abandoned - still_used)
    if dropped:
        did.append(f"removed the unused added token ids {sorted(dropped)}")
    if model is not None:
        _sync_model_configs(tokenizer, model, limit, found, did)
    if not found:
        return None
    return report("special_tokens", "; ".join(found), "; ".join(did))


def _replacement(tokenizer, role: str, vocab: dict[str, int], model, limit: int | None) -> tuple[str | None, str]:
    """The token that should fill ``role``: the one the model's configs name, else (EOS) the chat template's."""
    by_id = {index: token for token, index in vocab.items()}

    def usable(token_id) -> bool:
        return isinstance(token_id, int) and token_id in by_id and (limit is None or token_id < limit)

    if model is not None:
        for name, config in model_configs(model):
            ids = getattr(config, role + "_id", None)
            for token_id in ids if isinstance(ids, list | tuple) else [ids]:
                if usable(token_id):
                    return by_id[token_id], f"the model's {name}"
    if role == "eos_token":
        token = end_of_turn_token(tokenizer)
        if token is not None and usable(vocab.get(token)):
            return token, "the token the chat template ends a reply with"
    return None, ""


def _sync_model_configs(tokenizer, model, limit: int, found: list[str], did: list[str]) -> None:
    """Copy BOS into the model's configs, and make them stop generation on the tokenizer's EOS."""
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    for name, config in model_configs(model):
        old = getattr(config, "bos_token_id", None)
        if bos_id is not None and old != bos_id:
            found.append(f"model {name}.bos_token_id {old} while the tokenizer's BOS is id {bos_id}")
            config.bos_token_id = bos_id
            did.append(f"{name}.bos_token_id -> {bos_id}")
        old = getattr(config, "eos_token_id", None)
        stops = [i for i in (old if isinstance(old, list | tuple) else [old]) if isinstance(i, int) and 0 <= i < limit]
        if eos_id is not None and eos_id not in stops:
            found.append(f"model {name}.eos_token_id {old} that does not stop on the tokenizer's EOS (id {eos_id})")
            # Keep the ids the model already stops on (a base model's end-of-document token stays useful).
            config.eos_token_id = [eos_id, *stops] if stops else eos_id
            did.append(f"{name}.eos_token_id -> {config.eos_token_id}")
