"""Token ids beyond the embedding matrix, and new tokens added with a chosen initialisation."""

import pytest
import torch

from swiftune_tokenizers_fix import add_new_tokens, fix_embedding_size, trainable_token_ids
from swiftune_tokenizers_fix.testing import build_chat_tokenizer, build_tiny_llama


def _rows(model):
    return model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()


def test_added_token_ids_beyond_the_embeddings_grow_them(repair_log):
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])])
    with pytest.raises(IndexError):
        model(input_ids=ids)  # the defect: the new ids index past the matrix
    mean_in, mean_out = (w[:384].float().mean(0) for w in _rows(model))

    repair = fix_embedding_size(tokenizer, model)

    assert repair.kind == "embedding_size" and "384..385" in repair.found and "'<tool_call>'" in repair.found
    embed, head = _rows(model)
    assert embed.shape[0] == head.shape[0] == model.config.vocab_size == 386
    assert torch.allclose(embed[384].float(), mean_in) and torch.allclose(head[385].float(), mean_out)
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert trainable_token_ids(model) == [384, 385] and model.get_input_embeddings().weight.requires_grad
    assert fix_embedding_size(tokenizer, model) is None and repair_log() == [str(repair)]


def test_new_tokens_use_the_spare_rows_of_a_padded_vocabulary(repair_log):
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer, vocab_size=448)  # padded to a multiple of 64, like Qwen and Llama 3
    mean = model.get_input_embeddings().weight[:384].detach().float().mean(0)

    ids = add_new_tokens(model, tokenizer, ["<think>", "</think>"], special=True)

    assert ids == [384, 385] and tokenizer("<think>x</think>", add_special_tokens=False)["input_ids"][::2] == ids
    assert model.get_input_embeddings().weight.shape[0] == 448  # never shrunk to the tokenizer's 386
    assert torch.allclose(model.get_input_embeddings().weight[384].detach().float(), mean)
    assert trainable_token_ids(model) == ids
    (line,) = repair_log()
    assert line.startswith("new_tokens: found 2 tokens") and "used spare rows of 448" in line


def test_interpolation_starts_a_new_word_near_its_pieces():
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer, tie_word_embeddings=True)
    pieces = tokenizer("Quillhaven", add_special_tokens=False)["input_ids"]
    weight = model.get_input_embeddings().weight.detach()
    expected = 0.5 * weight[:384].float().mean(0) + 0.5 * weight[pieces].float().mean(0)

    (token_id,) = add_new_tokens(model, tokenizer, ["Quillhaven"], init="interpolation")

    assert token_id == 384 and model.get_input_embeddings().weight.shape[0] == 385
    assert torch.allclose(model.get_input_embeddings().weight[token_id].detach().float(), expected, atol=1e-6)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert tokenizer("Quillhaven", add_special_tokens=False)["input_ids"] == [token_id]


def test_tokens_already_in_the_vocabulary_are_not_added_again(repair_log):
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    assert add_new_tokens(model, tokenizer, ["<|im_end|>"]) == [2]
    assert len(tokenizer) == 384 and repair_log() == [] and trainable_token_ids(model) == []


def test_add_new_tokens_refuses_bad_arguments():
    tokenizer = build_chat_tokenizer()
    model = build_tiny_llama(tokenizer)
    with pytest.raises(ValueError, match="init must be one of"):
        add_new_tokens(model, tokenizer, ["<x>"], init="zeros")
    with pytest.raises(TypeError, match="list of tokens"):
        add_new_tokens(model, tokenizer, "<x>")
    with pytest.raises(TypeError, match="model"):
        add_new_tokens(tokenizer, model, ["<x>"])
