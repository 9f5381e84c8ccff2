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
_SAFE_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.gguf")
_PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth")
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


def has_only_pickle_weights(path: str | os.PathLike) -> bool:
    """True when a model folder's weights are pickle files (.bin/.pt/.pth) only, with no safetensors or GGUF."""
    folder = Path(path)
    if any(next(folder.glob(p), None) for p in _SAFE_WEIGHT_PATTERNS):
        return False
    return any(next(folder.glob(p), None) for p in _PICKLE_WEIGHT_PATTERNS)


def check_weight_safety(path: str | os.PathLike, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse, before anything is read, a model folder whose loading would run code the user did not agree to.

    Two things run code: unpickling ``.bin``/``.pt`` weights (a pickle can call any function), and the Python files
    a folder ships for an architecture transformers does not know (``auto_map`` in config.json). A folder with
    ``auto_map`` whose ``model_type`` transformers knows loads with transformers' own classes, so it is accepted.

    Args:
        path: a local model folder (from :func:`resolve_model_path`).
        allow_pickle: accept pickle weights when the folder has no safetensors.
        trust_remote_code: accept a folder that needs its own code.

    Raises:
        ValueError: a safetensors file that is cut short or broken, pickle-only weights without ``allow_pickle``, or
            remote code without ``trust_remote_code``.
    """
    folder = Path(path)
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors_complete(weights)
    if not allow_pickle and has_only_pickle_weights(folder):
        raise ValueError(
            f"Model folder '{folder}' holds only pickle weights (.bin/.pt), and unpickling runs code stored in the "
            "file; convert them to safetensors, or pass allow_pickle=True if you trust where the folder came from."
        )
    if trust_remote_code:
        return
    config = _read_config(folder)
    if config.get("auto_map") and not _known_model_type(config.get("model_type")):
        raise ValueError(
            f"Model folder '{folder}' needs its own Python code (auto_map in config.json, model_type "
            f"{config.get('model_type')!r} unknown to transformers), which swiftune does not run unless asked; pass "
            "trust_remote_code=True if you trust that code."
        )


def _read_config(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"'{folder / 'config.json'}' is not valid JSON ({error}); restore the model's config."
        ) from None


def _known_model_type(model_type) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def check_safetensors_complete(path: str | os.PathLike) -> None:
    """Raise a ValueError naming the file when its header is unreadable or its size is not what the header says.

    A file cut short (an interrupted copy) otherwise fails inside the safetensors reader with a message that names
    neither the file nor the fix. Reads the header only.
    """
    import json

    path = Path(path)
    size = path.stat().st_size
    problem = None
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little") if size >= 8 else -1
        if not 0 < header_size <= size - 8:
            problem = "its header is missing or cut off"
        else:
            try:
                header = json.loads(handle.read(header_size))
                end = max((entry["data_offsets"][1] for key, entry in header.items() if key[:2] != "__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                problem = "its header is not valid"
            else:
                if 8 + header_size + end != size:
                    problem = f"it holds {size} bytes where its header describes {8 + header_size + end}"
    if problem is not None:
        raise ValueError(f"'{path}' is not a complete safetensors file ({problem}); copy or save the model again.")
