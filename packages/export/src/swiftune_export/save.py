"""``save_merged``: one front door to the export formats (peft adapter, merged 16-bit safetensors, GGUF + Ollama)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from swiftune_export.atomic import atomic_directory
from swiftune_export.gguf_export import write_gguf
from swiftune_export.gguf_quant_types import quant_type
from swiftune_export.merge import _TOKENIZER_FILES, load_adapter, merge_adapter
from swiftune_export.ollama import write_modelfile

METHODS = ("lora", "merged_16bit", "gguf")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".txt")


def save_merged(
    model_or_adapter_dir: str | os.PathLike,
    tokenizer=None,
    out: str | os.PathLike = "swiftune-output/export",
    method: str = "merged_16bit",
    quantization: str | list[str] = ("q8_0",),
    base_dir: str | os.PathLike | None = None,
    ollama: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a trained adapter (or a full model folder) as a peft adapter, merged safetensors or GGUF files.

    Args:
        model_or_adapter_dir: a peft LoRA adapter folder, or a full model folder (config.json + safetensors).
        tokenizer: the tokenizer to ship with the export: an object with ``save_pretrained``, a folder holding
            tokenizer files, or None for the one in the input folder (or the adapter's base).
        out: the folder to create; it appears complete or not at all.
        method: ``"lora"`` (a plain peft adapter folder), ``"merged_16bit"`` (the adapter merged into its base, in
            the base's dtype, as sharded safetensors) or ``"gguf"`` (merged, then one GGUF per quantization).
        quantization: for ``"gguf"``: one name or a list, e.g. ``["q4_k", "q8_0"]``; files are ``model-<q>.gguf``.
        base_dir: the adapter's base model folder, when not the one recorded in adapter_config.json.
        ollama: for ``"gguf"``: also write a Modelfile for the first quantization when the chat format is known.
        overwrite: replace an existing non-empty ``out``.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: an unknown method or quantization, ``"lora"`` from a folder that is not an adapter, or a base
            stored quantized (4-bit / 8-bit bases cannot be merged into 16-bit weights here).
        FileNotFoundError: the input folders or their files are missing.
    """
    source = Path(model_or_adapter_dir).expanduser()
    if method not in METHODS:
        raise ValueError(f"Unknown export method {method!r}; choose one of {list(METHODS)}.")
    quants = [quantization] if isinstance(quantization, str) else list(quantization)
    if method == "gguf":
        if not quants:
            raise ValueError("method='gguf' needs at least one quantization, e.g. quantization=['q8_0'].")
        for name in quants:
            quant_type(name)  # fail before any work on an unknown name
    is_adapter = (source / "adapter_config.json").is_file()
    if is_adapter:
        config, _ = load_adapter(source)
        base = Path(base_dir if base_dir is not None else config.get("base_model_name_or_path") or "").expanduser()
        if method != "lora":
            _refuse_quantized_base(base)
    elif not (source / "config.json").is_file():
        raise FileNotFoundError(f"'{source}' is neither a peft adapter folder nor a model folder with config.json.")
    elif method == "lora":
        raise ValueError(f"method='lora' needs a peft adapter folder; '{source}' is a full model.")
    else:
        _refuse_quantized_base(source)

    with atomic_directory(out, overwrite=overwrite) as staging:
        if method == "lora":
            for name in _ADAPTER_FILES:
                shutil.copy2(source / name, staging / name)
            _write_tokenizer(tokenizer, source, staging)
        elif method == "merged_16bit":
            _merged_folder(source, is_adapter, base_dir, staging, tokenizer)
        else:
            # The merged safetensors are an intermediate on disk, so memory stays at one tensor.
            merged = staging / ".merged"
            _merged_folder(source, is_adapter, base_dir, merged, tokenizer)
            files = [write_gguf(merged, staging / f"model-{name.lower()}.gguf", quant=name) for name in quants]
            shutil.copy2(merged / "config.json", staging / "config.json")
            _copy_tokenizer_files(merged, staging)
            shutil.rmtree(merged)
            if ollama:
                _try_modelfile(staging, files[0])
    return Path(out)


def _merged_folder(source: Path, is_adapter: bool, base_dir, target: Path, tokenizer) -> None:
    if is_adapter:
        # merge_adapter stages its own folder beside ``target`` and renames it into place.
        merge_adapter(source, target, base_dir=base_dir, overwrite=True)
    else:
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and path.suffix in _MODEL_FILE_SUFFIXES:
                shutil.copy2(path, target / path.name)
    _write_tokenizer(tokenizer, source, target)


def _write_tokenizer(tokenizer, source: Path, target: Path) -> None:
    if tokenizer is None:
        _copy_tokenizer_files(source, target)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(target))
    else:
        folder = Path(tokenizer).expanduser()
        if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"Tokenizer folder '{folder}' has no tokenizer.json or tokenizer_config.json.")
        _copy_tokenizer_files(folder, target)


def _copy_tokenizer_files(source: Path, target: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _refuse_quantized_base(model_dir: Path) -> None:
    config_path = model_dir / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("quantization_config"):
        raise ValueError(
            f"The base model '{model_dir}' is stored quantized (quantization_config in its config.json); merging needs "
            "the 16-bit base it was quantized from: pass base_dir= that folder."
        )


def _try_modelfile(folder: Path, gguf_file: Path) -> None:
    try:
        write_modelfile(folder, gguf_file, tokenizer=folder)
    except ValueError as error:  # a chat format without an Ollama template: the GGUF files are still the export
        warnings.warn(f"No Ollama Modelfile written: {error}", stacklevel=3)
