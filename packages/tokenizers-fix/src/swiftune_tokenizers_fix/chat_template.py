"""Rendering probe conversations through a chat template, and adding a missing generation-prompt branch."""

from __future__ import annotations

import json
import logging

from swiftune_tokenizers_fix._validate import require_fast_tokenizer
from swiftune_tokenizers_fix.report import Repair, report

logger = logging.getLogger("swiftune_tokenizers_fix")

# Contents unlikely to occur in any template, so that they can be found again in the rendered text.
USER_PROBE = "swiftuneprobeuser"
ASSISTANT_PROBE = "swiftuneprobeassistant"
SYSTEM_PROBE = "swiftuneprobesystem"

_USER = {"role": "user", "content": USER_PROBE}
_ASSISTANT = {"role": "assistant", "content": ASSISTANT_PROBE}
_SYSTEM = {"role": "system", "content": SYSTEM_PROBE}


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str | None:
    """Render ``messages`` with the tokenizer's chat template, or None when the template cannot render them.

    A chat template is user code: some refuse a system role or a conversation shape with ``raise_exception``. The
    probes here only need one rendering that works, so any failure means "try another conversation".
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # noqa: BLE001 - see the docstring: a template may fail in any way
        logger.debug("The chat template cannot render %s: %s", [m["role"] for m in messages], error)
        return None


def template_token_ids(tokenizer) -> set[int]:
    """Token ids that the chat template writes around a system, user and assistant turn and a generation prompt.

    BOS is included when the tokenizer adds it, since it is part of every training sequence.
    """
    ids: set[int] = set()
    for messages in ([_SYSTEM, _USER, _ASSISTANT, _USER], [_USER, _ASSISTANT, _USER]):
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        if text is not None:
            ids.update(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids


def end_of_turn_token(tokenizer) -> str | None:
    """The first added token that the chat template writes after an assistant reply (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``), or None. It is the token a chat model emits to stop."""
    text = render_chat(tokenizer, [_USER, _ASSISTANT])
    if text is None or ASSISTANT_PROBE not in text:
        return None
    after = text[text.index(ASSISTANT_PROBE) + len(ASSISTANT_PROBE) :]
    added = {index: str(token) for index, token in tokenizer.added_tokens_decoder.items()}
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in added:
            return added[token_id]
    return None


def fix_generation_prompt(tokenizer) -> Repair | None:
    """Add an ``add_generation_prompt`` branch to a chat template that ignores that flag.

    Without it, a prompt rendered for generation ends after the user turn, so the model has to guess the assistant
    header and often answers as the user or never starts. The branch is derived from the template itself: the text
    it writes between the end of a user turn and the start of an assistant reply.

    Args:
        tokenizer: a fast tokenizer; its ``chat_template`` is changed in place.

    Returns:
        The repair, or None when the template has a working branch, has no template, or writes nothing before a
        reply (then an empty generation prompt is correct).

    Raises:
        ValueError: the branch is missing and cannot be derived; the message says what to add.
    """
    require_fast_tokenizer(tokenizer, "fix_generation_prompt")
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        return None
    without = render_chat(tokenizer, [_USER], add_generation_prompt=False)
    with_prompt = render_chat(tokenizer, [_USER], add_generation_prompt=True)
    if without is None or with_prompt is None or with_prompt != without:
        return None
    full = render_chat(tokenizer, [_USER, _ASSISTANT])
    if full is None or not full.startswith(without) or ASSISTANT_PROBE not in full[len(without) :]:
        raise ValueError(
            "The chat template ignores add_generation_prompt and the assistant header cannot be derived from it "
            "(a conversation with a reply does not extend the same conversation without it). Append "
            "\"{% if add_generation_prompt %}{{ '<assistant header>' }}{% endif %}\" to tokenizer.chat_template."
        )
    # A trailing space belongs to the reply's first word in sentencepiece and byte-level BPE vocabularies: a prompt
    # that ends with it would make the model start a reply with a token it never saw there in training.
    prompt = full[len(without) : full.index(ASSISTANT_PROBE, len(without))].rstrip(" ")
    if not prompt:
        return None
    # json.dumps gives a double-quoted literal whose escapes (\n, \", \\) Jinja's lexer reads back unchanged.
    tokenizer.chat_template = (
        template + "{% if add_generation_prompt %}{{ " + json.dumps(prompt, ensure_ascii=False) + " }}{% endif %}"
    )
    if render_chat(tokenizer, [_USER], add_generation_prompt=True) != without + prompt:
        tokenizer.chat_template = template
        raise ValueError(
            "swiftune derived the generation prompt "
            f"{prompt!r} but the template does not render it at the end; add the add_generation_prompt branch "
            "to tokenizer.chat_template by hand."
        )
    return report(
        "generation_prompt",
        "a chat template that ignores add_generation_prompt",
        f"appended a branch that writes {prompt!r}, the text the template puts before an assistant reply",
    )
