"""One example far longer than max_seq_length: decided behaviour is truncation with a warning, not an error.

The example is cut at max_seq_length (its end, and so possibly its answer, is lost), a warning counts the cut examples
and says to raise max_seq_length, and training goes on with the other examples. An error would stop a long run for
one row out of millions; a dataset in which EVERY label is cut away is an error (case labels_all_masked).
"""

from __future__ import annotations

import logging

MAX = 64


def test_long_example_is_truncated_with_a_warning_by_the_api(assets, loaded_model, caplog):
    from swiftune_data import IGNORE_INDEX, load_conversations, tokenize_conversations

    tokenizer = loaded_model[1]
    conversations = load_conversations(str(assets.long_dataset))
    untruncated = tokenize_conversations(conversations, tokenizer, 10**9)
    assert max(len(ids) for ids in untruncated["input_ids"]) > 10 * MAX  # really far longer
    with caplog.at_level(logging.WARNING, logger="swiftune_data"):
        tokenized = tokenize_conversations(conversations, tokenizer, MAX)
    assert "1 of 5 conversations were longer than max_length=64 tokens and were truncated" in caplog.text
    assert "raise max_length" in caplog.text
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    assert max(lengths) == MAX and sum(length == MAX for length in lengths) == 1
    # The short examples are untouched, and still train.
    for cut, whole in zip(tokenized, untruncated, strict=True):
        assert cut["input_ids"] == whole["input_ids"][:MAX] and cut["labels"] == whole["labels"][:MAX]
    assert any(label != IGNORE_INDEX for row in tokenized["labels"] for label in row)


def test_long_example_is_truncated_with_a_warning_by_the_command(cli_runs, tmp_path_factory):
    result = cli_runs.result("long_example")
    assert result["rc"] == 0, result["stderr"][-3000:]
    assert "were truncated; raise max_length" in result["stderr"]
    assert "adapter saved to" in result["stdout"]
