"""A chat template without an add_generation_prompt branch gets one derived from the template itself."""

import pytest

from swiftune_tokenizers_fix import fix_generation_prompt
from swiftune_tokenizers_fix.testing import CHATML_TEMPLATE, build_chat_tokenizer

CHATML_WITHOUT_BRANCH = CHATML_TEMPLATE[: CHATML_TEMPLATE.index("{% if add_generation_prompt %}")]
USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_missing_generation_prompt_branch_is_derived_and_added(repair_log):
    tokenizer = build_chat_tokenizer()
    tokenizer.chat_template = CHATML_WITHOUT_BRANCH
    rendered = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_end|>\n")  # the defect: no assistant header for the model to continue

    repair = fix_generation_prompt(tokenizer)

    assert repair.kind == "generation_prompt" and "'<|im_start|>assistant\\n'" in repair.did
    reference = build_chat_tokenizer()  # the same template with its branch written by hand
    for flag in (True, False):
        for messages in (USER, USER + [{"role": "assistant", "content": "Paris."}]):
            assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=flag) == (
                reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=flag)
            )
    assert fix_generation_prompt(tokenizer) is None
    assert repair_log() == [str(repair)]


def test_template_with_a_branch_is_left_alone(repair_log):
    tokenizer = build_chat_tokenizer()
    assert fix_generation_prompt(tokenizer) is None
    assert tokenizer.chat_template == CHATML_TEMPLATE and repair_log() == []


def test_template_whose_reply_follows_the_prompt_directly_needs_no_branch():
    # Llama 2 style: the reply follows "[/INST]" after a space; a generation prompt of " " would make the model
    # start with a lone space token it never saw there.
    tokenizer = build_chat_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
    )
    template = tokenizer.chat_template
    assert fix_generation_prompt(tokenizer) is None and tokenizer.chat_template == template


def test_template_that_cannot_be_derived_is_an_error_saying_what_to_add():
    tokenizer = build_chat_tokenizer()
    tokenizer.chat_template = CHATML_WITHOUT_BRANCH + "<|endoftext|>"  # ends every conversation, so no prefix
    with pytest.raises(ValueError, match="add_generation_prompt"):
        fix_generation_prompt(tokenizer)
