"""Plain-text formats used with many base models: Alpaca, Vicuna v1.1 and Zephyr. They end replies with the
tokenizer's own EOS, and their markers are ordinary text, so no token is added for them."""

from swiftune_data.chat_templates.spec import ChatTemplate

_ALPACA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"
)
# Vicuna's generation prompt ends at the colon: the space belongs to the reply's first word, as in its training.
_VICUNA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + ' ' }}"
    "{%- elif message['role'] == 'user' %}{{- 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' %}{{- 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)
_ZEPHYR = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)

ALPACA = ChatTemplate(
    "alpaca",
    _ALPACA,
    None,
    "### Instruction:\n",
    "### Response:\n",
    default_system_message=(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    ),
)
VICUNA = ChatTemplate(
    "vicuna",
    _VICUNA,
    None,
    "USER:",
    "ASSISTANT:",
    default_system_message=(
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions."
    ),
)
ZEPHYR = ChatTemplate("zephyr", _ZEPHYR, None, "<|user|>\n", "<|assistant|>\n")
