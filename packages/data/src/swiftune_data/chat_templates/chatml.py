"""ChatML (OpenAI's markup, used by many fine-tunes) and Qwen 2.5, which writes the same turns."""

from swiftune_data.chat_templates.spec import ChatTemplate

# <|im_start|>{role}\n{content}<|im_end|>\n for every turn; a reply opens with <|im_start|>assistant\n.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

CHATML = ChatTemplate(
    name="chatml",
    template=CHATML_TEMPLATE,
    stop_token="<|im_end|>",
    instruction_part="<|im_start|>user\n",
    response_part="<|im_start|>assistant\n",
    special_tokens=_CHATML_TOKENS,
)

# Qwen 2.5 Instruct renders ChatML and, with no system turn, inserts its own identity as the system message.
QWEN_2_5 = ChatTemplate(
    name="qwen-2.5",
    template=CHATML_TEMPLATE,
    stop_token="<|im_end|>",
    instruction_part="<|im_start|>user\n",
    response_part="<|im_start|>assistant\n",
    special_tokens=_CHATML_TOKENS,
    default_system_message="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
)
