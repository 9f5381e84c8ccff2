"""The bundled SmolLM2-135M-Instruct tokenizer through swiftune-tokenizers-fix, end to end.

Its one defect is real: pad is EOS (<|im_end|>), so collators that mask padding out of the labels also mask every
end of turn and the model never learns to stop. The repair reuses <|endoftext|> (SmolLM2's unknown token and
pretraining document separator, which chat data never contains), so no token is added and no embedding changes.
Everything else must come out exactly as it went in.
"""

import logging

import pytest
import torch

from swiftune_loader import default_model_path
from swiftune_tokenizers_fix import (
    PROBE_TEXT,
    fix_tokenizer,
    fix_untrained_tokens,
    load_tokenizer,
    trainable_token_ids,
)

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_path()
    return folder, AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)


def _encodings(tokenizer):
    rendered = [
        tokenizer.apply_chat_template(CHAT[:n], tokenize=False, add_generation_prompt=g)
        for n, g in ((1, True), (2, False))
    ]
    return (
        [tokenizer(text)["input_ids"] for text in [PROBE_TEXT, *rendered]],
        tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"],
        rendered,
    )


def test_bundled_smollm2_gets_a_pad_token_and_nothing_else_changes(bundled, caplog, tmp_path):
    folder, reference, model = bundled
    caplog.set_level(logging.WARNING, logger="swiftune_tokenizers_fix")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2  # the defect, as shipped
    embeddings = model.get_input_embeddings().weight.detach().clone()

    _, repairs = fix_tokenizer(tokenizer, model)

    assert [r.kind for r in repairs] == ["pad_token"]
    assert [r.getMessage() for r in caplog.records if r.name == "swiftune_tokenizers_fix"] == [str(repairs[0])]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 0
    # Nothing else moved: vocabulary, special tokens, template, padding side, encodings, embeddings.
    assert tokenizer.get_vocab() == reference.get_vocab() and len(tokenizer) == 49152
    for name in ("bos_token", "eos_token", "unk_token", "chat_template", "padding_side"):
        assert getattr(tokenizer, name) == getattr(reference, name), name
    assert _encodings(tokenizer) == _encodings(reference)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == 49152
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert model.generation_config.eos_token_id == 2 and model.config.bos_token_id == 1

    # A repaired tokenizer has nothing left to repair, also after a save and reload, and no row is untrained.
    assert fix_tokenizer(tokenizer, model)[1] == []
    tokenizer.save_pretrained(tmp_path)
    assert fix_tokenizer(load_tokenizer(tmp_path), model)[1] == []
    assert fix_untrained_tokens(model, tokenizer, [{"messages": CHAT}]) == [] and trainable_token_ids(model) == []
