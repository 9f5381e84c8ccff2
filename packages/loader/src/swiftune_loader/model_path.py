"""Turn what the user passed as a model name into a local folder, or say clearly why it cannot be one.

Order: the bundled default model's names; a local folder; a hub id, mapped through the 16-bit / 4-bit name table
(:mod:`swiftune_loader.model_names`) and looked up in the local Hugging Face cache. Nothing is downloaded: there
is no network where swiftune runs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from swiftune_loader.default_model import DEFAULT_MODEL_NAME, default_model_path
from swiftune_loader.hub_cache import cached_snapshot, hub_cache_dir
from swiftune_loader.model_names import resolve_model_name

logger = logging.getLogger(__name__)

# Names that mean "the bundled default model".
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL_NAME.lower(), f"huggingfacetb/{DEFAULT_MODEL_NAME.lower()}"}
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.gguf", "*.bin", "*.pt", "*.pth")
# "org/name" as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model_name: str | os.PathLike | None, load_in_4bit: bool = False) -> Path:
    """Return the local folder for ``model_name``.

    ``None``, ``"default"`` and ``"SmolLM2-135M-Instruct"`` name the bundled default model. An existing path
    must be a folder holding a ``config.json`` and weights. A hub id (``"org/name"``) is first mapped through the
    name table (to its pre-quantized 4-bit repository when ``load_in_4bit``, to its 16-bit one otherwise), then
    looked up in the local Hugging Face cache: the mapped repository, else the name as given.

    Args:
        model_name: a folder, a hub id, or None for the bundled default model.
        load_in_4bit: whether the model will be loaded in 4-bit (picks the twin repository of the name table).

    Raises:
        FileNotFoundError: the path does not exist, is not a model folder, or the hub id is not in the cache.
    """
    key = None if model_name is None else str(model_name).strip()
    if key is None or key.lower() in _DEFAULT_ALIASES:
        local = Path(key) if key else None
        if local is None or not local.exists():
            return default_model_path()
    path = Path(str(model_name)).expanduser()
    if not path.exists():
        if _HUB_ID.match(key):
            return _check_model_folder(_from_hub_cache(key, load_in_4bit), key)
        raise FileNotFoundError(f"Model path '{model_name}' does not exist; pass the folder that holds config.json.")
    return _check_model_folder(path, model_name)


def _from_hub_cache(name: str, load_in_4bit: bool) -> Path:
    """The cached snapshot of ``name`` (or of its twin in the name table); a clear error when none is cached."""
    wanted = resolve_model_name(name, load_in_4bit)
    candidates = [wanted] + ([name] if name.lower() != wanted.lower() else [])
    for repo_id in candidates:
        snapshot = cached_snapshot(repo_id)
        if snapshot is not None:
            logger.info("Model '%s' resolved to the cached %s at %s.", name, repo_id, snapshot)
            return snapshot
    names = " or ".join(f"'{c}'" for c in candidates)
    raise FileNotFoundError(
        f"'{name}' is not a local folder, and {names} is not in the Hugging Face cache ({hub_cache_dir()}); there is "
        "no network here and swiftune never downloads: copy the model folder to this machine and pass its path, or "
        f"run `huggingface-cli download {wanted}` on a machine with network and point HF_HUB_CACHE at that cache."
    )


def _check_model_folder(path: Path, model_name) -> Path:
    if path.is_file():
        raise FileNotFoundError(
            f"Model path '{model_name}' is a file; pass the folder that holds config.json and the weights."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"'{model_name}' is not a model folder: it has no config.json.")
    if not any(next(path.glob(p), None) for p in _WEIGHT_PATTERNS):
        raise FileNotFoundError(f"Model folder '{model_name}' has a config.json but no weight files (*.safetensors).")
    return path
