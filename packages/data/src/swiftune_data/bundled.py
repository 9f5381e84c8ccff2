"""The bundled Quillhaven dataset: facts about a fictional island town that no base model knows."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def bundled_dataset_path(split: str = "train") -> Path:
    """Path of the bundled JSONL file for ``split`` ("train" or "test"), in OpenAI messages format."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    return Path(str(files("swiftune_data") / "bundled" / f"quillhaven_{split}.jsonl"))
