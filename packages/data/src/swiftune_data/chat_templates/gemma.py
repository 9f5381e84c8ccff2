"""Gemma, Gemma 2 and Gemma 3: ``<start_of_turn>user|model`` turns closed by ``<end_of_turn>``."""

from swiftune_data.chat_templates.spec import ChatTemplate

# Gemma has no system role: as Gemma 3's template documents, the system message opens the first user turn,
# separated by a blank line. Gemma 1 and 2 refuse a system turn; folding it the same way lets one dataset serve all.
_SYSTEM_FOLD = (
    "{{- '<bos>' }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
)
_CLOSE = (
    "{{- '<end_of_turn>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)
_TEXT = "{{- message['content'] | trim }}"
# Gemma 3 is multimodal: content may be a list of parts; text parts are written, images are left to a processor.
_TEXT_OR_PARTS = (
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] | trim }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
)
_TOKENS = ("<bos>", "<start_of_turn>", "<end_of_turn>")
_USER, _MODEL = "<start_of_turn>user\n", "<start_of_turn>model\n"

GEMMA = ChatTemplate("gemma", _SYSTEM_FOLD + _TEXT + _CLOSE, "<end_of_turn>", _USER, _MODEL, special_tokens=_TOKENS)
GEMMA_2 = ChatTemplate("gemma-2", _SYSTEM_FOLD + _TEXT + _CLOSE, "<end_of_turn>", _USER, _MODEL, special_tokens=_TOKENS)
GEMMA_3 = ChatTemplate(
    "gemma-3", _SYSTEM_FOLD + _TEXT_OR_PARTS + _CLOSE, "<end_of_turn>", _USER, _MODEL, special_tokens=_TOKENS
)
