"""Never-trained embedding rows that the chat template or the data use are set to the mean of the trained rows."""

import pytest
import torch

from swiftune_tokenizers_fix import fix_untrained_tokens, trainable_token_ids
from swiftune_tokenizers_fix.testing import build_chat_tokenizer, build_tiny_llama


def _zero(model, token_id):
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = 0
        model.get_output_embeddings().weight[token_id] = 0


def test_untrained_rows_used_by_the_template_or_data_are_set_to_the_mean(repair_log):
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer)  # untied: both matrices must be repaired
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (data_token,) = tokenizer(" Marrow", add_special_tokens=False)["input_ids"][-1:]
    unused = tokenizer.convert_tokens_to_ids("<|pad|>")
    for token_id in (im_end, data_token, unused):
        _zero(model, token_id)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    trained = [i for i in range(384) if i not in (im_end, data_token, unused)]
    mean_in, mean_out = embed[trained].detach().float().mean(0), head[trained].detach().float().mean(0)
    dataset = [{"messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Sea of Marrow"}]}]

    fixed = fix_untrained_tokens(model, tokenizer, dataset)

    assert fixed == sorted([im_end, data_token])
    for token_id in fixed:
        assert torch.allclose(embed[token_id].detach().float(), mean_in)
        assert torch.allclose(head[token_id].detach().float(), mean_out)
    assert embed[unused].abs().max() == 0  # padding that nothing uses stays as it is
    assert trainable_token_ids(model) == fixed
    (line,) = repair_log()
    assert line.startswith("untrained_tokens: found never-trained embedding rows for 2 used tokens")
    assert fix_untrained_tokens(model, tokenizer, dataset) == []


def test_without_data_only_template_tokens_are_repaired():
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer, tie_word_embeddings=True)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    (data_token,) = tokenizer(" Marrow", add_special_tokens=False)["input_ids"][-1:]
    _zero(model, im_start)
    _zero(model, data_token)
    assert fix_untrained_tokens(model, tokenizer) == [im_start]
    assert model.get_input_embeddings().weight[data_token].abs().max() == 0
    assert fix_untrained_tokens(model, tokenizer, [{"input_ids": torch.tensor([[1, data_token]])}]) == [data_token]


def test_trained_model_is_left_alone(repair_log):
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    before = model.get_input_embeddings().weight.detach().clone()
    assert fix_untrained_tokens(model, tokenizer, ["Quillhaven"]) == []
    assert torch.equal(model.get_input_embeddings().weight, before) and repair_log() == []


def test_bad_dataset_rows_and_empty_weights_are_errors():
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    with pytest.raises(ValueError, match="'input_ids', 'messages' or 'text'"):
        fix_untrained_tokens(model, tokenizer, [{"prompt": "x"}])
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
    with pytest.raises(ValueError, match="did not load"):
        fix_untrained_tokens(model, tokenizer)
