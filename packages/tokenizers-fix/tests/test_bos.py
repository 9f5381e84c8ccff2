"""A double BOS: the chat template writes BOS and the tokenizer adds another when the text is encoded."""

from swiftune_tokenizers_fix import fix_double_bos
from swiftune_tokenizers_fix.testing import CHATML_TEMPLATE, add_bos_on_encode, build_chat_tokenizer

BOS_TEMPLATE = "{{ bos_token }}" + CHATML_TEMPLATE
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]


def test_double_bos_is_found_and_the_tokenizer_stops_adding_one(tmp_path, repair_log):
    from transformers import AutoTokenizer

    tokenizer = add_bos_on_encode(build_chat_tokenizer())
    tokenizer.chat_template = BOS_TEMPLATE
    bos = tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer(text)["input_ids"][:2] == [bos, bos]  # the defect

    repair = fix_double_bos(tokenizer)

    assert repair.kind == "double_bos" and f"[{bos}, {bos}]" in repair.found
    assert tokenizer(text)["input_ids"][:2] == [bos, tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"].count(bos) == 1
    assert tokenizer.chat_template == BOS_TEMPLATE  # the template, what the model was tuned with, is kept
    assert repair_log() == [str(repair)]
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"].count(bos) == 1
    assert fix_double_bos(tokenizer) is None


def test_one_bos_either_way_is_left_alone(repair_log):
    template_only = build_chat_tokenizer()
    template_only.chat_template = BOS_TEMPLATE
    tokenizer_only = add_bos_on_encode(build_chat_tokenizer())
    for tokenizer in (template_only, tokenizer_only):
        before = tokenizer.backend_tokenizer.to_str()
        assert fix_double_bos(tokenizer) is None
        assert tokenizer.backend_tokenizer.to_str() == before
    assert tokenizer_only("hi")["input_ids"][0] == tokenizer_only.bos_token_id
    assert repair_log() == []
