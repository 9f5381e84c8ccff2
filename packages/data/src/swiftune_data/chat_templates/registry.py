"""The one table of chat templates, by name."""

from __future__ import annotations

from swiftune_data.chat_templates.chatml import CHATML, QWEN_2_5
from swiftune_data.chat_templates.gemma import GEMMA, GEMMA_2, GEMMA_3
from swiftune_data.chat_templates.llama3 import LLAMA_3, LLAMA_3_1
from swiftune_data.chat_templates.mistral import MISTRAL
from swiftune_data.chat_templates.phi import PHI_3, PHI_4
from swiftune_data.chat_templates.plain_text import ALPACA, VICUNA, ZEPHYR
from swiftune_data.chat_templates.qwen3 import QWEN_3
from swiftune_data.chat_templates.spec import ChatTemplate

CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        CHATML,
        LLAMA_3,
        LLAMA_3_1,
        MISTRAL,
        GEMMA,
        GEMMA_2,
        GEMMA_3,
        QWEN_2_5,
        QWEN_3,
        PHI_3,
        PHI_4,
        ALPACA,
        VICUNA,
        ZEPHYR,
    )
}


def chat_template_spec(name: str) -> ChatTemplate:
    """The registered template called ``name``.

    Raises:
        ValueError: no template has that name; the message lists the names known.
    """
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"Unknown chat template {name!r}; known templates: {', '.join(CHAT_TEMPLATES)}.") from None
