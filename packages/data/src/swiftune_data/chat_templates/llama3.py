"""Llama 3 and Llama 3.1: header tokens around each role, <|eot_id|> after each turn."""

from swiftune_data.chat_templates.spec import ChatTemplate

_TURNS = (
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
_LLAMA_3 = "{{- '<|begin_of_text|>' }}" + _TURNS

# Llama 3.1 always writes a system turn that opens with its knowledge cut-off and today's date (a fixed default
# date unless date_string is passed), followed by the user's system message if there is one.
_LLAMA_3_1 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: '"
    " + date_string + '\n\n' + system_message + '<|eot_id|>' }}" + _TURNS
)
_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"

LLAMA_3 = ChatTemplate("llama-3", _LLAMA_3, "<|eot_id|>", _USER, _ASSISTANT, special_tokens=_TOKENS)
LLAMA_3_1 = ChatTemplate("llama-3.1", _LLAMA_3_1, "<|eot_id|>", _USER, _ASSISTANT, special_tokens=_TOKENS)
