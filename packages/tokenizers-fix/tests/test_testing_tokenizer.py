from swiftune_tokenizers_fix.testing import build_chat_tokenizer


def test_tiny_tokenizer_round_trips_text_and_renders_chatml():
    tokenizer = build_chat_tokenizer()
    text = "Quillhaven was founded in 1742."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_tokenizer_without_pad_token():
    assert build_chat_tokenizer(pad_token=None).pad_token is None
