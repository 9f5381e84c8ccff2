"""Reading local dataset files (JSON, JSONL, CSV, Parquet, text) into a `datasets.Dataset`."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


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
    try:
        dataset = load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # the readers raise many types; the user needs the file name and the reason
        raise ValueError(f"Could not parse '{path}' as {builder}: {error}") from error
    if len(dataset) == 0:
        raise ValueError(f"Dataset file '{path}' holds no rows.")
    return dataset
