"""A pad token distinct from EOS, and the model's configs told about it."""

from __future__ import annotations

from swiftune_tokenizers_fix._validate import embedding_rows, model_configs, require_fast_tokenizer, require_model
from swiftune_tokenizers_fix.chat_template import template_token_ids
from swiftune_tokenizers_fix.report import Repair, report

# Tokens that model families reserve for padding, in order of preference.
PAD_TOKEN_NAMES = (
    "<|finetune_right_pad_id|>",  # Llama 3.1+
    "<pad>",  # Mistral Nemo, Gemma, T5
    "<|pad|>",
    "[PAD]",
    "<|padding|>",
    "<|vision_pad|>",  # Qwen2.5
    "<|PAD_TOKEN|>",
)
# Reserved or unused tokens that families ship for later use; any one of them can pad.
RESERVED_TOKEN_PREFIXES = (
    "<|reserved_special_token",
    "<|reserved",
    "<unused",
    "[control_",
    "<|placeholder",
    "<|extra_",
)
NEW_PAD_TOKEN = "<|pad|>"


def fix_pad_token(tokenizer, model=None) -> Repair | None:
    """Give the tokenizer a pad token that is not EOS, and set the model's pad_token_id to it.

    When pad is EOS, collators that mask padding out of the labels mask every EOS too: the model never learns to
    stop. A reserved or unused token is reused when the vocabulary has one (no new embedding row), then the unknown
    token, and only then a new token is added (the embedding repair then grows the model).

    Args:
        tokenizer: a fast tokenizer, changed in place.
        model: optional; its ``config`` and ``generation_config`` get the tokenizer's pad_token_id.

    Returns:
        The repair, or None when the pad token and the model's configs were already right.
    """
    require_fast_tokenizer(tokenizer, "fix_pad_token")
    if model is not None:
        require_model(model, "fix_pad_token")
    vocab = tokenizer.get_vocab()
    pad, eos_id = tokenizer.pad_token, tokenizer.eos_token_id
    found, did = [], []
    if pad is None:
        found.append("no pad token")
    elif pad not in vocab:
        found.append(f"pad token {pad!r} that is not in the vocabulary (it encodes as id {tokenizer.pad_token_id})")
    elif eos_id is not None and vocab[pad] == eos_id:
        found.append(f"pad token {pad!r} equal to EOS (id {eos_id}), so masking padding also masks every EOS")
    if found:
        token, how = _choose_pad_token(tokenizer, vocab, model)
        if how == "added":
            from tokenizers import AddedToken

            tokenizer.add_special_tokens({"pad_token": AddedToken(token, special=True, normalized=False)})
        else:
            tokenizer.pad_token = token
        did.append(f"pad token is now {token!r} (id {tokenizer.pad_token_id}, {how})")
    if model is not None:
        for name, config in model_configs(model):
            old = getattr(config, "pad_token_id", None)
            if old != tokenizer.pad_token_id:
                config.pad_token_id = tokenizer.pad_token_id
                did.append(f"model {name}.pad_token_id {old} -> {tokenizer.pad_token_id}")
                if not found:
                    found.append(f"model {name}.pad_token_id {old} that differs from the tokenizer's pad token")
    if not did:
        return None
    return report("pad_token", "; ".join(found), "; ".join(did))


def _choose_pad_token(tokenizer, vocab: dict[str, int], model) -> tuple[str, str]:
    """Pick the pad token: a token reserved for padding, a reserved or unused one, the unknown token, or a new one."""
    limit = embedding_rows(model) if model is not None else None
    # Padding must not collide with tokens that carry meaning in every sequence: masking padding would mask them.
    taken = template_token_ids(tokenizer) | {tokenizer.eos_token_id, tokenizer.bos_token_id}

    def usable(token: str) -> bool:
        token_id = vocab.get(token)
        return token_id is not None and token_id not in taken and (limit is None or token_id < limit)

    for name in PAD_TOKEN_NAMES:
        if usable(name):
            return name, "reused the token reserved for padding"
    # The last reserved token is the least likely to have been given a meaning by a later release of the family.
    reserved = [
        str(t) for _, t in sorted(tokenizer.added_tokens_decoder.items()) if str(t).startswith(RESERVED_TOKEN_PREFIXES)
    ]
    for token in reversed(reserved):
        if usable(token):
            return token, "reused a reserved, unused token"
    if tokenizer.unk_token is not None and usable(tokenizer.unk_token):
        return tokenizer.unk_token, "reused the unknown token, which the chat template does not use"
    token = NEW_PAD_TOKEN
    while token in vocab:
        token = f"<{token}>"
    return token, "added"
