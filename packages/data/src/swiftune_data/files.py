"""Reading local dataset files (JSON, JSONL, CSV, Parquet, text) into a `datasets.Dataset`."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Text formats must be UTF-8: the readers otherwise guess (JSON falls back to Latin-1) and train on mangled text.
_TEXT_BUILDERS = {"json", "csv", "text"}
_CHUNK_BYTES = 1 << 20


def load_dataset_file(path: str | os.PathLike) -> Dataset:
    """Load one local file as a Dataset, choosing the reader by the file's extension.

    Raises:
        FileNotFoundError: the path does not exist or is a folder.
        ValueError: the extension is unknown, the file cannot be parsed, or it holds no rows.
    """
    from datasets import load_dataset

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Dataset file '{path}' does not exist.")
    if path.is_dir():
        raise FileNotFoundError(
            f"Dataset path '{path}' is a folder; pass one .jsonl, .json, .csv, .parquet or .txt file."
        )
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"Cannot read '{path.name}': use one of {', '.join(sorted(_BUILDERS))}.")
    if builder in _TEXT_BUILDERS:
        check_utf8(path)
    try:
        dataset = load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # the readers raise many types; the user needs the file name and the reason
        raise ValueError(f"Could not parse '{path}' as {builder}: {error}") from error
    if len(dataset) == 0:
        raise ValueError(f"Dataset file '{path}' holds no rows.")
    return dataset


def check_utf8(path: str | os.PathLike) -> None:
    """Raise a ValueError naming the byte offset when a text file is not valid UTF-8 (read in 1 MiB chunks).

    Raises:
        ValueError: the first byte that does not decode, and what to do about it.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"Dataset file '{path}' is not UTF-8 (near byte {offset + error.start}); "
                    "re-save it as UTF-8, e.g. with iconv -f latin1 -t utf-8."
                ) from None
            if not chunk:
                return
            offset += len(chunk)
