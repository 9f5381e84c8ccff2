"""What the registry knows about one chat template: its Jinja text, stop token, turn markers and tokens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    """One registered chat template.

    Attributes:
        name: the registry key, e.g. ``"llama-3.1"``.
        template: the Jinja source, written for ``{"role", "content"}`` messages.
        stop_token: the token that ends an assistant turn, or None when it is the tokenizer's own EOS (templates
            such as alpaca that are used with many base models write ``eos_token``).
        instruction_part: the text that opens a user turn; masking stops training there.
        response_part: the text that opens an assistant turn; masking starts training after it.
        special_tokens: tokens the template writes that must be single, never-split tokens.
        added_tokens: tokens that must be single tokens but stay visible when decoding (Qwen 3's think tags).
        default_system_message: the system turn inserted when a conversation has none, or None.
    """

    name: str
    template: str
    stop_token: str | None
    instruction_part: str
    response_part: str
    special_tokens: tuple[str, ...] = ()
    added_tokens: tuple[str, ...] = ()
    default_system_message: str | None = None
