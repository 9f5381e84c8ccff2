"""Phi 3 (``<|user|>\\n...<|end|>\\n``) and Phi 4 (ChatML tokens with ``<|im_sep|>`` and no newlines)."""

from swiftune_data.chat_templates.spec import ChatTemplate

_PHI_3 = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)
_PHI_4 = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"
)

PHI_3 = ChatTemplate(
    "phi-3",
    _PHI_3,
    "<|end|>",
    "<|user|>\n",
    "<|assistant|>\n",
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
)
PHI_4 = ChatTemplate(
    "phi-4",
    _PHI_4,
    "<|im_end|>",
    "<|im_start|>user<|im_sep|>",
    "<|im_start|>assistant<|im_sep|>",
    special_tokens=("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
)
