"""Raw text (no turns) cut into training sequences of at most ``max_length`` token ids, with an overlap."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset

from swiftune_data.tokenize import IGNORE_INDEX


def chunk_text(source, tokenizer, max_length: int, stride: int = 0, add_eos: bool = True) -> Dataset:
    """Tokenize documents into one stream and cut it into chunks of ``max_length`` ids that overlap by ``stride``.

    Each chunk after the first starts with the last ``stride`` ids of the previous one, so that its first
    predictions have context; those overlapping ids are labeled -100 there, since the previous chunk already
    trains on them. Every id of the stream is thus labeled exactly once.

    Args:
        source: a path to a text file (the whole file is one document; .jsonl/.json/.csv/.parquet files are read
            with :func:`swiftune_data.load_dataset_file` and their ``text`` column used), a list of strings, or a
            Dataset with a ``text`` column; each string or row is one document.
        tokenizer: encodes the documents, without special tokens.
        max_length: ids per chunk; the last chunk may be shorter.
        stride: ids shared by consecutive chunks, from 0 to ``max_length - 1``.
        add_eos: end every document with the tokenizer's EOS so that the model learns where texts end.

    Returns:
        A Dataset with ``input_ids`` and ``labels``.

    Raises:
        ValueError: ``max_length`` or ``stride`` is out of range, EOS is asked for but missing, or the text is empty.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}.")
    if not 0 <= stride < max_length:
        raise ValueError(f"stride must be from 0 to max_length - 1 ({max_length - 1}), got {stride}.")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token to end documents with; set one or pass add_eos=False.")
    stream: list[int] = []
    for document in _documents(source):
        stream += tokenizer(document, add_special_tokens=False)["input_ids"]
        if add_eos:
            stream.append(tokenizer.eos_token_id)
    if not stream:
        raise ValueError("The text is empty: there is nothing to chunk.")
    step = max_length - stride
    rows = []
    for start in range(0, len(stream), step):
        ids = stream[start : start + max_length]
        overlap = 0 if start == 0 else stride
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * overlap + ids[overlap:]})
        if start + max_length >= len(stream):
            break
    return Dataset.from_list(rows)


def _documents(source) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.suffix.lower() == ".txt":
            if not path.is_file():
                raise FileNotFoundError(f"Text file '{path}' does not exist.")
            return [path.read_text(encoding="utf-8")]
        from swiftune_data.files import load_dataset_file

        source = load_dataset_file(path)
    if isinstance(source, Dataset):
        if "text" not in source.column_names:
            raise ValueError(f"Expected a 'text' column for raw text, found {source.column_names}.")
        return list(source["text"])
    if isinstance(source, list) and all(isinstance(item, str) for item in source):
        return source
    raise ValueError("chunk_text() takes a file path, a list of strings, or a Dataset with a 'text' column.")
