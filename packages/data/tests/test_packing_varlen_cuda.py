"""The varlen metadata through a real flash-attention varlen kernel (``torch.nn.attention.varlen.varlen_attn``).

transformers hands ``cu_seq_lens_q/k`` and ``max_length_q/k`` from the batch to the attention function, as its
flash-attention path does; the function registered here passes them on to PyTorch's varlen flash kernel. Runs on a
CUDA GPU only (CI has none; it runs on the device machine).
"""

import pytest
import torch

from swiftune_data import IGNORE_INDEX, DataCollatorForPackedSequences

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash kernel needs a CUDA GPU")
TEXTS = [
    "Quillhaven is an island town in the Sea of Marrow.",
    "It was founded in 1742.",
    "The quick brown fox jumps over the lazy dog, and then some more words follow.",
]


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, length, dim = query.shape
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if cu_q is None:  # an unpacked batch: each row is one sequence
        cu_q = cu_k = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        max_q = max_k = length
    kv_heads = key.shape[1]
    out = varlen_attn(
        query.transpose(1, 2).reshape(batch * length, heads, dim),
        key.transpose(1, 2).reshape(batch * length, kv_heads, dim).repeat_interleave(heads // kv_heads, dim=1),
        value.transpose(1, 2).reshape(batch * length, kv_heads, dim).repeat_interleave(heads // kv_heads, dim=1),
        cu_q.to(query.device),
        cu_k.to(query.device),
        int(max_q),
        int(max_k),
        scale=scaling,
        window_size=(-1, 0),  # causal
    )
    return out.reshape(batch, length, heads, dim), None


@pytest.fixture(scope="module")
def model(tokenizer):
    pytest.importorskip("torch.nn.attention.varlen")
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    AttentionInterface.register("swiftune_test_varlen", _varlen_attention)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="swiftune_test_varlen",
    )
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return [{"input_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in TEXTS]


def _forward(model, batch):
    keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    present = [k for k in keys if batch.get(k) is not None]
    inputs = {k: (batch[k].cuda() if torch.is_tensor(batch[k]) else batch[k]) for k in present}
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits.float()


@pytest.mark.parametrize("two_rows", [False, True])
def test_varlen_kernel_keeps_packed_samples_apart(model, examples, tokenizer, two_rows):
    lengths = [len(e["input_ids"]) for e in examples]
    max_length = max(lengths[0] + lengths[1], lengths[2]) if two_rows else None
    batch = DataCollatorForPackedSequences(max_length=max_length, pad_token_id=tokenizer.pad_token_id)(examples)
    packed = _forward(model, batch)
    place, row, column = [], 0, 0
    for length in lengths:  # rows are filled in order; a row ends where its labels turn into trailing padding
        if max_length is not None and column + length > max_length:
            row, column = row + 1, 0
        place.append((row, column, column + length))
        column += length
    for example, (row, start, end) in zip(examples, place, strict=True):
        assert batch["input_ids"][row, start:end].tolist() == example["input_ids"]
        alone = _forward(model, {"input_ids": torch.tensor([example["input_ids"]]), "position_ids": None})[0]
        torch.testing.assert_close(packed[row, start:end], alone, atol=2e-2, rtol=2e-2)
    assert (batch["labels"][batch["input_ids"] == tokenizer.pad_token_id] == IGNORE_INDEX).all()


def test_control_one_sequence_per_row_contaminates(model, examples):
    batch = DataCollatorForPackedSequences()(examples)
    total = batch["input_ids"].shape[1]
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, total], dtype=torch.int32)
    batch["max_length_q"] = batch["max_length_k"] = total
    packed = _forward(model, batch)
    start = len(examples[0]["input_ids"])
    alone = _forward(model, {"input_ids": torch.tensor([examples[1]["input_ids"]]), "position_ids": None})[0]
    assert (packed[0, start : start + len(examples[1]["input_ids"])] - alone).abs().max() > 0.1
