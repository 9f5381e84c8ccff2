"""Chat templates: one registry (``CHAT_TEMPLATES``), one file per model family."""

from swiftune_data.chat_templates.apply import get_chat_template, registered_template_of
from swiftune_data.chat_templates.registry import CHAT_TEMPLATES, chat_template_spec
from swiftune_data.chat_templates.spec import ChatTemplate

__all__ = ["CHAT_TEMPLATES", "ChatTemplate", "chat_template_spec", "get_chat_template", "registered_template_of"]
