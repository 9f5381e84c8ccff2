"""get_peft_model(offload_embeddings=True): the input embedding's table leaves the model's parameters for host memory,
and training and generation give exactly what they give without it."""

import pytest
import torch

from swiftune_kernels.modules import HostEmbedding
from swiftune_loader import FastLanguageModel
from swiftune_loader.testing import build_tiny_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer


def _loss_and_grads(model_dir, offload: bool):
    model, _ = FastLanguageModel.from_pretrained(model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, offload_embeddings=offload)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():  # B = 0 at init would leave most gradients zero
        if "lora_B" in name:
            parameter.data.normal_(std=0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12)).to(model.device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return model, loss.detach(), grads


def test_training_is_unchanged_and_the_table_is_no_parameter(tiny_model_dir):
    _, loss, grads = _loss_and_grads(tiny_model_dir, offload=False)
    model, offloaded_loss, offloaded_grads = _loss_and_grads(tiny_model_dir, offload=True)
    assert torch.equal(offloaded_loss, loss)
    assert offloaded_grads.keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(offloaded_grads[name], grad), name
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, HostEmbedding) and embedding.weight.device.type == "cpu"
    assert not any("embed_tokens" in name for name, _ in model.named_parameters())
    assert any(key.endswith("embed_tokens.weight") for key in model.state_dict())
    assert model.base_model.model._swiftune_embedding_offload.host is embedding


def test_generation_is_unchanged(tiny_model_dir):
    replies = []
    for offload in (False, True):
        model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
        model = FastLanguageModel.get_peft_model(model, r=4, offload_embeddings=offload)
        FastLanguageModel.for_inference(model)
        prompt = torch.tensor([[1, 5, 9, 2]], device=model.device)
        replies.append(model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))
    assert torch.equal(replies[0], replies[1])


def test_revert_puts_an_equal_gpu_embedding_back(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    table = model.get_input_embeddings().weight.detach().clone()
    model = FastLanguageModel.get_peft_model(model, r=4, offload_embeddings=True)
    model.base_model.model._swiftune_embedding_offload.revert()
    embedding = model.get_input_embeddings()
    assert type(embedding) is torch.nn.Embedding and torch.equal(embedding.weight, table)
    assert not embedding.weight.requires_grad


def test_a_tied_embedding_is_refused(tmp_path):
    folder = build_tiny_model(tmp_path / "tied", build_chat_tokenizer(), tie_word_embeddings=True)
    model, _ = FastLanguageModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="tied to the LM head"):
        FastLanguageModel.get_peft_model(model, r=4, offload_embeddings=True)
    embedding = model.get_input_embeddings()
    assert type(embedding) is torch.nn.Embedding and embedding.weight.requires_grad  # nothing changed
    assert not hasattr(model, "_swiftune_offload")  # the checkpointing was not switched on either


@pytest.mark.parametrize("kwargs", [{"modules_to_save": ["embed_tokens"]}, {"trainable_token_indices": [3, 4]}])
def test_a_trained_embedding_is_refused_and_left_as_it_was(tiny_model_dir, kwargs):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="offload_embeddings off"):
        FastLanguageModel.get_peft_model(model, r=4, offload_embeddings=True, **kwargs)
    embedding = model.get_input_embeddings()
    assert type(embedding) is torch.nn.Embedding and embedding.weight.requires_grad
