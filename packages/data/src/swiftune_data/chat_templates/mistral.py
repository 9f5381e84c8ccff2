"""Mistral Instruct: ``<s>[INST] question [/INST] answer</s>``, the system message leading the first question."""

from swiftune_data.chat_templates.spec import ChatTemplate

# BOS and EOS are the tokenizer's own (<s> and </s> in Mistral's vocabularies). [INST] is plain text in the v1
# vocabulary, so it is not added as a token.
_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_prefix = messages[0]['content'] + '\n\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_prefix = '' %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system_prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

MISTRAL = ChatTemplate("mistral", _TEMPLATE, None, "[INST]", "[/INST]")
