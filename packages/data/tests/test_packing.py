import pytest
import torch

from swiftune_data import IGNORE_INDEX, DataCollatorForPackedSequences, block_causal_mask, pack_sequences

TEXTS = [
    "Quillhaven is an island town in the Sea of Marrow.",
    "It was founded in 1742.",
    "The quick brown fox jumps over the lazy dog, and then some more words follow.",
]


@pytest.fixture(scope="module")
def examples(tokenizer):
    rows = []
    for index, text in enumerate(TEXTS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # The first sample has a masked prompt; the others are trained from their first token, which packing
        # must mask (it would be predicted from the previous sample).
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:] if index == 0 else list(ids)})
    return rows


def _tiny_llama(tokenizer, attention):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attention,
    )
    return LlamaForCausalLM(config).eval()


def _alone_logits(model, example):
    with torch.no_grad():
        return model(input_ids=torch.tensor([example["input_ids"]])).logits[0]


def _two_rows(examples):
    """A max_length that puts the first two samples in one row and the third in a second one."""
    lengths = [len(e["input_ids"]) for e in examples]
    return max(lengths[0] + lengths[1], lengths[2])


def _segments(batch, pad_token_id=None):
    """(row, start, end) of every sample, read back from the restarting position ids; segments made only of
    ``pad_token_id`` (a row's padding) are left out."""
    found = []
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:], strict=False):
            if pad_token_id is None or not (batch["input_ids"][row, start:end] == pad_token_id).all():
                found.append((row, start, end))
    return found


def test_pack_sequences_restarts_positions_and_masks_each_first_label(examples):
    (row,) = pack_sequences(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert row["seq_lengths"] == lengths
    assert row["input_ids"] == [i for e in examples for i in e["input_ids"]]
    assert row["position_ids"] == [p for n in lengths for p in range(n)]
    # A sample's first token is never the target of the previous sample's last token.
    expected_labels = [label for e in examples for label in [IGNORE_INDEX] + e["labels"][1:]]
    assert row["labels"] == expected_labels


def test_pack_sequences_fills_rows_in_order_up_to_max_length(examples):
    lengths = [len(e["input_ids"]) for e in examples]
    max_length = _two_rows(examples)
    rows = pack_sequences(examples, max_length)
    assert [r["seq_lengths"] for r in rows] == [lengths[:2], lengths[2:]]
    assert all(len(r["input_ids"]) <= max_length for r in rows)
    with pytest.raises(ValueError, match="more than max_length"):
        pack_sequences(examples, max(lengths) - 1)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["block_causal", "varlen"])
@pytest.mark.parametrize("max_length", [None, "two_rows"])
def test_packed_logits_equal_each_sample_alone(tokenizer, examples, attention, mode, max_length):
    model = _tiny_llama(tokenizer, attention)
    if max_length == "two_rows":  # two rows of different lengths: the shorter one is padded
        max_length = _two_rows(examples)
    collator = DataCollatorForPackedSequences(
        max_length=max_length, attention=mode, pad_token_id=tokenizer.pad_token_id
    )
    batch = collator(examples)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    # transformers derives the block mask from restarting position ids only when no KV cache is built.
    inputs["use_cache"] = False
    with torch.no_grad():
        packed = model(**inputs).logits
    segments = _segments(batch, tokenizer.pad_token_id)
    for example, (row, start, end) in zip(examples, segments, strict=True):
        assert batch["input_ids"][row, start:end].tolist() == example["input_ids"]
        torch.testing.assert_close(packed[row, start:end], _alone_logits(model, example), atol=1e-5, rtol=1e-5)


def test_without_the_mask_samples_contaminate_each_other(tokenizer, examples):
    # The control for the test above: a plain causal pass over the same row lets the second sample see the first.
    model = _tiny_llama(tokenizer, "sdpa")
    batch = DataCollatorForPackedSequences()(examples)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"]).logits
    _, start, end = _segments(batch)[1]
    assert not torch.allclose(packed[0, start:end], _alone_logits(model, examples[1]), atol=1e-3)


def test_packed_loss_is_the_sum_of_the_samples_losses(tokenizer, examples):
    model = _tiny_llama(tokenizer, "eager")
    batch = DataCollatorForPackedSequences(attention="block_causal")(examples)

    def summed_loss(logits, labels):
        return torch.nn.functional.cross_entropy(
            logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
        )

    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}).logits
        alone = sum(summed_loss(_alone_logits(model, e)[None], torch.tensor([e["labels"]])) for e in examples)
    torch.testing.assert_close(summed_loss(logits, batch["labels"]), alone)


def test_varlen_metadata_matches_the_samples(examples):
    lengths = [len(e["input_ids"]) for e in examples]
    batch = DataCollatorForPackedSequences(attention="varlen")(examples)
    expected = torch.cumsum(torch.tensor([0, *lengths]), 0).to(torch.int32)
    assert torch.equal(batch["cu_seq_lens_q"], expected) and torch.equal(batch["cu_seq_lens_k"], expected)
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch


def test_varlen_metadata_counts_padding_as_its_own_segment(examples):
    rows = pack_sequences(examples, _two_rows(examples))
    batch = DataCollatorForPackedSequences(max_length=_two_rows(examples))(examples)
    row_length = batch["input_ids"].shape[1]
    assert row_length == max(len(r["input_ids"]) for r in rows)
    segments = []
    for row in rows:
        padding = row_length - len(row["input_ids"])
        segments += row["seq_lengths"] + ([padding] if padding else [])
    assert len(segments) == len(examples) + 1  # exactly one of the two rows is padded
    assert batch["cu_seq_lens_q"].tolist() == torch.cumsum(torch.tensor([0, *segments]), 0).tolist()
    assert batch["cu_seq_lens_q"][-1] == batch["input_ids"].numel()
    for index, row in enumerate(rows):
        assert (batch["labels"][index, len(row["input_ids"]) :] == IGNORE_INDEX).all()


def test_block_causal_mask_allows_exactly_earlier_tokens_of_the_same_sample():
    mask = block_causal_mask([[2, 3]], length=6)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends to itself only, so that softmax has a finite row
    ]


def test_bad_collator_arguments():
    with pytest.raises(ValueError, match="attention must be one of"):
        DataCollatorForPackedSequences(attention="flash")
    with pytest.raises(ValueError, match="empty batch"):
        DataCollatorForPackedSequences()([])
    with pytest.raises(ValueError, match="input ids and .* labels"):
        pack_sequences([{"input_ids": [1, 2], "labels": [1]}])


def test_packed_gradients_equal_the_samples_run_one_by_one(tokenizer, examples):
    model = _tiny_llama(tokenizer, "eager").train()
    batch = DataCollatorForPackedSequences(attention="block_causal")(examples)

    def summed_loss(logits, labels):
        return torch.nn.functional.cross_entropy(
            logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
        )

    logits = model(**{k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}).logits
    summed_loss(logits, batch["labels"]).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for example in examples:
        alone = model(input_ids=torch.tensor([example["input_ids"]])).logits
        summed_loss(alone, torch.tensor([example["labels"]])).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
