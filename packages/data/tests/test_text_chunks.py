import datasets
import pytest

from swiftune_data import IGNORE_INDEX, chunk_text

TEXT = "Quillhaven is an island town in the Sea of Marrow, founded in 1742. " * 6


def _stream(tokenizer, documents):
    ids = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


@pytest.mark.parametrize("stride", [0, 1, 7])
def test_chunks_cover_the_stream_with_the_overlap_and_label_each_id_once(tokenizer, stride):
    max_length = 16
    stream = _stream(tokenizer, [TEXT, "A second document."])
    rows = chunk_text([TEXT, "A second document."], tokenizer, max_length, stride=stride).to_list()
    step = max_length - stride
    assert len(rows) == -(-(len(stream) - stride) // step)  # ceil: chunks needed to reach the end
    for index, row in enumerate(rows):
        assert row["input_ids"] == stream[index * step : index * step + max_length]
        assert 0 < len(row["input_ids"]) <= max_length
    # Overlapping ids are context in the later chunk only: the labeled ids, in order, are the stream itself.
    labeled = [label for row in rows for label in row["labels"] if label != IGNORE_INDEX]
    assert labeled == stream
    assert all(row["labels"][:stride] == [IGNORE_INDEX] * stride for row in rows[1:])


def test_text_file_is_one_document(tokenizer, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsecond line\n")
    rows = chunk_text(path, tokenizer, max_length=1024).to_list()
    assert rows == [{"input_ids": _stream(tokenizer, ["first line\nsecond line\n"]), "labels": rows[0]["input_ids"]}]


def test_dataset_text_column_and_no_eos(tokenizer):
    dataset = datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}])
    rows = chunk_text(dataset, tokenizer, max_length=64, add_eos=False).to_list()
    # Documents are tokenized one by one, so no BPE merge crosses a document boundary.
    expected = [i for text in ("one", "two") for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert rows == [{"input_ids": expected, "labels": expected}]
    assert tokenizer.eos_token_id not in rows[0]["input_ids"]


@pytest.mark.parametrize(("max_length", "stride", "match"), [(0, 0, "max_length"), (8, 8, "stride"), (8, -1, "stride")])
def test_bad_lengths(tokenizer, max_length, stride, match):
    with pytest.raises(ValueError, match=match):
        chunk_text([TEXT], tokenizer, max_length, stride=stride)


def test_empty_text_and_wrong_source(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        chunk_text([""], tokenizer, 8, add_eos=False)
    with pytest.raises(ValueError, match="'text' column"):
        chunk_text(datasets.Dataset.from_list([{"prompt": "a"}]), tokenizer, 8)
