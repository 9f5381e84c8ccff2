from pathlib import Path

import pytest

from swiftune_data import CHAT_TEMPLATES, get_chat_template, registered_template_of
from swiftune_tokenizers_fix.testing import CHATML_TEMPLATE, build_chat_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
# The conversation written out by hand, per family, in fixtures/chat_templates/<name>.txt (and the first user turn
# with the generation prompt in <name>.generation.txt), from each family's documented prompt format.
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
# Templates that write the tokenizer's own BOS/EOS render them as Llama 2 / Mistral vocabularies spell them.
OWN_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


def _with_template(name, **kwargs):
    return get_chat_template(build_chat_tokenizer(), name, **kwargs)


def _fixture(name):
    return (FIXTURES / name).read_text(encoding="utf-8")


def test_every_registered_template_has_fixtures_and_no_fixture_is_orphaned():
    names = {path.name.removesuffix(".generation.txt").removesuffix(".txt") for path in FIXTURES.glob("*.txt")}
    assert names == set(CHAT_TEMPLATES)
    required = {"chatml", "llama-3", "llama-3.1", "mistral", "gemma", "gemma-2", "gemma-3", "qwen-2.5", "qwen-3"}
    assert required | {"phi-3", "phi-4", "alpaca", "vicuna", "zephyr"} <= set(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_template_renders_the_documented_format(name):
    tokenizer = _with_template(name)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, **OWN_TOKENS) == _fixture(f"{name}.txt")
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True, **OWN_TOKENS)
    assert prompt == _fixture(f"{name}.generation.txt")


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_template_tokens_are_single_tokens_and_eos_is_the_stop_token(name):
    tokenizer = build_chat_tokenizer()
    own_eos = tokenizer.eos_token
    get_chat_template(tokenizer, name)
    spec = CHAT_TEMPLATES[name]
    for token in spec.special_tokens + spec.added_tokens:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.eos_token == (spec.stop_token or own_eos)
    assert tokenizer.convert_tokens_to_ids(tokenizer.eos_token) == tokenizer.eos_token_id
    # The stop token ends the assistant's reply in the rendering, so training teaches the model to emit it.
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered[rendered.rindex("4") + 1 :].startswith(tokenizer.eos_token)


def test_map_eos_token_false_keeps_the_tokenizers_eos():
    tokenizer = build_chat_tokenizer()
    get_chat_template(tokenizer, "llama-3", map_eos_token=False)
    assert tokenizer.eos_token == "<|im_end|>"
    assert get_chat_template(build_chat_tokenizer(), "llama-3").eos_token == "<|eot_id|>"


def test_sharegpt_mapping_renders_as_openai_messages():
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    spelled = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": spelled[m["role"]], "value": m["content"]} for m in CONVERSATION]
    mapped = _with_template("llama-3", mapping=mapping).apply_chat_template(sharegpt, tokenize=False)
    assert mapped == _fixture("llama-3.txt")


def test_unknown_mapping_key_is_refused():
    with pytest.raises(ValueError, match="Unknown mapping keys \\['speaker'\\]"):
        _with_template("chatml", mapping={"speaker": "from"})


def test_default_and_custom_system_message():
    question = [{"role": "user", "content": "Hi"}]
    default = _with_template("qwen-2.5").apply_chat_template(question, tokenize=False)
    # Qwen 2.5 documents this identity as the system turn of a conversation that has none.
    identity = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert default == f"<|im_start|>system\n{identity}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    custom = _with_template("qwen-2.5", system_message="Be kind.").apply_chat_template(question, tokenize=False)
    assert custom == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    # A conversation's own system turn wins over the default.
    own = _with_template("qwen-2.5", system_message="Be kind.").apply_chat_template(CONVERSATION, tokenize=False)
    assert own == _fixture("qwen-2.5.txt")


def test_qwen3_thinking_is_kept_on_the_last_reply_only_and_can_be_switched_off():
    tokenizer = _with_template("qwen-3")
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>greet</think>Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "greet" not in rendered and "<|im_start|>assistant\nHello!<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_gemma3_takes_content_parts():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    rendered = _with_template("gemma-3").apply_chat_template(parts, tokenize=False)
    assert rendered == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown chat template 'llama-9'.*chatml, llama-3"):
        _with_template("llama-9")


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_registered_template_is_recognised(name):
    spec = registered_template_of(_with_template(name))
    # Families that share a template (chatml and qwen-2.5, gemma and gemma-2) share their markers.
    assert (spec.instruction_part, spec.response_part) == (
        CHAT_TEMPLATES[name].instruction_part,
        CHAT_TEMPLATES[name].response_part,
    )


def test_a_models_own_template_is_recognised_by_what_it_renders():
    tokenizer = build_chat_tokenizer()
    assert tokenizer.chat_template == CHATML_TEMPLATE  # written elsewhere, not by our registry
    assert registered_template_of(tokenizer).response_part == "<|im_start|>assistant\n"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert registered_template_of(tokenizer) is None
