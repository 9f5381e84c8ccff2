"""Turn what the user passed as a model name into a local folder, or say clearly why it cannot be one."""

from __future__ import annotations

import os
from pathlib import Path

from swiftune_loader.default_model import DEFAULT_MODEL_NAME, default_model_path

# Names that mean "the bundled default model".
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL_NAME.lower(), f"huggingfacetb/{DEFAULT_MODEL_NAME.lower()}"}
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.gguf", "*.bin", "*.pt", "*.pth")


def resolve_model_path(model_name: str | os.PathLike | None) -> Path:
    """Return the local folder for ``model_name``.

    ``None``, ``"default"`` and ``"SmolLM2-135M-Instruct"`` name the bundled default model. Anything else must be
    a local folder holding a ``config.json``: swiftune never downloads.

    Raises:
        FileNotFoundError: the path does not exist, or is not a model folder.
    """
    key = None if model_name is None else str(model_name).strip()
    if key is None or key.lower() in _DEFAULT_ALIASES:
        local = Path(key) if key else None
        if local is None or not local.exists():
            return default_model_path()
    path = Path(str(model_name)).expanduser()
    if not path.exists():
        hint = (
            " It looks like a hub id; swiftune never downloads: copy the model folder to this machine "
            "and pass its path."
            if "/" in str(model_name) and not str(model_name).startswith((".", "/", "~"))
            else ""
        )
        raise FileNotFoundError(f"Model path '{model_name}' does not exist.{hint}")
    if path.is_file():
        raise FileNotFoundError(
            f"Model path '{model_name}' is a file; pass the folder that holds config.json and the weights."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"'{model_name}' is not a model folder: it has no config.json.")
    if not any(next(path.glob(p), None) for p in _WEIGHT_PATTERNS):
        raise FileNotFoundError(f"Model folder '{model_name}' has a config.json but no weight files (*.safetensors).")
    return path
