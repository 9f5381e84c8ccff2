"""Setting a registered chat template on a tokenizer, and finding which registered template a tokenizer uses."""

from __future__ import annotations

import json
import logging

from swiftune_data.chat_templates.registry import CHAT_TEMPLATES, chat_template_spec
from swiftune_data.chat_templates.spec import ChatTemplate

logger = logging.getLogger("swiftune_data")

_ROLES = ("system", "user", "assistant")
_PROBE = [
    {"role": "system", "content": "swiftune probe system"},
    {"role": "user", "content": "swiftune probe user"},
    {"role": "assistant", "content": "swiftune probe assistant"},
    {"role": "user", "content": "swiftune probe user again"},
    {"role": "assistant", "content": "swiftune probe assistant again"},
]


def get_chat_template(
    tokenizer,
    name: str = "chatml",
    mapping: dict[str, str] | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
):
    """Give ``tokenizer`` a registered chat template, with its stop token and EOS.

    Tokens the template writes that the tokenizer lacks (e.g. ``<|im_start|>`` on a Llama tokenizer) are added as
    special tokens and logged: the model's embeddings must then grow to the tokenizer's length
    (``swiftune_tokenizers_fix.fix_embedding_size``) and those rows be trained.

    Args:
        tokenizer: a fast tokenizer, changed in place.
        name: a key of ``CHAT_TEMPLATES`` (``"llama-3.1"``, ``"gemma-3"``, ``"qwen-3"``, ...).
        mapping: how the dataset's messages are spelled, for ShareGPT-style data, e.g.
            ``{"role": "from", "content": "value", "user": "human", "assistant": "gpt"}``; missing keys keep the
            OpenAI spelling.
        map_eos_token: make the template's stop token the tokenizer's EOS, so that training ends each reply with
            the token generation stops on.
        system_message: the system message used when a conversation has none, replacing the template's default.

    Returns:
        The same tokenizer.

    Raises:
        ValueError: the name or a mapping key is unknown, or the template cannot render a conversation.
    """
    spec = chat_template_spec(name)
    _add_missing_tokens(tokenizer, spec)
    default_system = system_message if system_message is not None else spec.default_system_message
    tokenizer.chat_template = _mapping_preamble(mapping) + _system_preamble(default_system) + spec.template
    stop = spec.stop_token or tokenizer.eos_token
    if stop is None:
        raise ValueError(f"The {name} template ends replies with the tokenizer's EOS, but the tokenizer has none.")
    if map_eos_token and tokenizer.eos_token != stop:
        logger.info("chat template %s: EOS changed from %r to its stop token %r.", name, tokenizer.eos_token, stop)
        tokenizer.eos_token = stop
    try:
        tokenizer.apply_chat_template(_remap(_PROBE, mapping), tokenize=False)
    except Exception as error:  # a Jinja error is the template's (or the mapping's) fault; say which
        raise ValueError(f"The {name} chat template cannot render a conversation: {error}") from error
    return tokenizer


def registered_template_of(tokenizer) -> ChatTemplate | None:
    """The registered template that ``tokenizer`` renders conversations with, or None.

    A template set by :func:`get_chat_template` ends with the registered source; a template that came with a model
    (e.g. Llama 3's own) is recognised when it renders a probe conversation exactly as a registered one does.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return None
    for spec in CHAT_TEMPLATES.values():
        if template.endswith(spec.template):
            return spec
    rendered = _render(tokenizer, template)
    if rendered is None:
        return None
    for spec in CHAT_TEMPLATES.values():
        if _render(tokenizer, spec.template) == rendered:
            return spec
    return None


def _render(tokenizer, template: str) -> str | None:
    try:
        return tokenizer.apply_chat_template(_PROBE, tokenize=False, chat_template=template)
    except Exception:  # noqa: BLE001 - a template may refuse the probe in any way; then it is simply not a match
        return None


def _add_missing_tokens(tokenizer, spec: ChatTemplate) -> None:
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    added = []
    for tokens, special in ((spec.special_tokens, True), (spec.added_tokens, False)):
        missing = [t for t in tokens if t not in vocab]
        if missing:
            tokenizer.add_tokens([AddedToken(t, special=special, normalized=False) for t in missing], special)
            added += missing
    if added:
        logger.warning(
            "chat template %s: added the tokens %s that the tokenizer lacked; grow the model's embeddings "
            "(swiftune_tokenizers_fix.fix_embedding_size) and train their rows.",
            spec.name,
            added,
        )


def _system_preamble(system_message: str | None) -> str:
    if system_message is None:
        return ""
    # json.dumps writes a double-quoted literal whose escapes Jinja's lexer reads back unchanged.
    return (
        "{%- if messages | length == 0 or messages[0]['role'] != 'system' %}"
        "{%- set messages = [{'role': 'system', 'content': " + json.dumps(system_message) + "}] + messages %}"
        "{%- endif %}"
    )


def _mapping_preamble(mapping: dict[str, str] | None) -> str:
    if not mapping:
        return ""
    unknown = set(mapping) - {"role", "content", *_ROLES}
    if unknown:
        raise ValueError(f"Unknown mapping keys {sorted(unknown)}; use role, content, {', '.join(_ROLES)}.")
    role_key, content_key = mapping.get("role", "role"), mapping.get("content", "content")
    roles = {mapping.get(role, role): role for role in _ROLES}
    # Rewrite the dataset's spelling into {"role", "content"} messages before the registered template runs, so
    # that every template is written once, for one spelling.
    return (
        "{%- set ns_map = namespace(messages=[]) %}{%- for m in messages %}"
        "{%- set ns_map.messages = ns_map.messages + [{'role': "
        + json.dumps(roles)
        + ".get(m["
        + json.dumps(role_key)
        + "], m["
        + json.dumps(role_key)
        + "]), 'content': m["
        + json.dumps(content_key)
        + "]}] %}"
        "{%- endfor %}{%- set messages = ns_map.messages %}"
    )


def _remap(messages: list[dict], mapping: dict[str, str] | None) -> list[dict]:
    if not mapping:
        return messages
    role_key, content_key = mapping.get("role", "role"), mapping.get("content", "content")
    return [{role_key: mapping.get(m["role"], m["role"]), content_key: m["content"]} for m in messages]
