"""Qwen 3: ChatML turns plus a <think> block on the replies that follow the last user turn."""

from swiftune_data.chat_templates.spec import ChatTemplate

# Qwen 3 keeps reasoning only for the replies after the last user message (earlier replies lose their <think>
# block), writes an empty block when a reply has no reasoning, and with enable_thinking=false pre-fills an empty
# block after the generation prompt so that the model answers directly.
_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning = '' %}"
    "{%- if message['reasoning_content'] is defined and message['reasoning_content'] is not none %}"
    "{%- set reasoning = message['reasoning_content'] %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

QWEN_3 = ChatTemplate(
    name="qwen-3",
    template=_TEMPLATE,
    stop_token="<|im_end|>",
    instruction_part="<|im_start|>user\n",
    response_part="<|im_start|>assistant\n",
    special_tokens=("<|im_start|>", "<|im_end|>"),
    added_tokens=("<think>", "</think>"),
)
