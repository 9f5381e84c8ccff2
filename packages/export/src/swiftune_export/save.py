"""``save_merged`` and ``save_gguf``: one front door to the export formats, for folders and for model objects.

The input is a folder (a peft LoRA adapter folder, whose base is found from adapter_config.json, or a full model
folder) or a model object (a transformers model, or a peft model over one, on any device, 16-bit or 4-bit).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from swiftune_export.atomic import atomic_directory
from swiftune_export.gguf_export import write_gguf
from swiftune_export.gguf_quant_types import quant_type
from swiftune_export.merge import _TOKENIZER_FILES, load_adapter
from swiftune_export.merged_folder import write_merged
from swiftune_export.model_source import folder_source, is_model_object, is_peft_model, object_source
from swiftune_export.ollama import write_modelfile

METHODS = ("lora", "merged_16bit", "merged_4bit", "gguf")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def save_merged(
    model,
    tokenizer=None,
    out: str | os.PathLike = "swiftune-output/export",
    method: str = "merged_16bit",
    quantization: str | list[str] = ("q8_0",),
    base_dir: str | os.PathLike | None = None,
    ollama: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Export a trained model as a peft adapter, merged safetensors (16-bit or 4-bit) or GGUF files.

    Args:
        model: a transformers or peft model object, a peft LoRA adapter folder, or a full model folder
            (config.json + safetensors).
        tokenizer: the tokenizer to ship with the export: an object with ``save_pretrained``, a folder holding
            tokenizer files, or None for the one in the input folder (or the adapter's base).
        out: the folder to create; it appears complete or not at all.
        method: ``"lora"`` (a plain peft adapter folder), ``"merged_16bit"`` (the adapter merged into its base in
            float32 and cast back to the base's dtype; a 4-bit base is dequantized to its compute dtype),
            ``"merged_4bit"`` (the same, with the linear layers then stored as bitsandbytes NF4 that plain
            transformers loads) or ``"gguf"`` (merged, then one GGUF per quantization).
        quantization: for ``"gguf"``: one name or a list, e.g. ``["q4_k_m", "q8_0"]``; files are
            ``model-<name>.gguf``.
        base_dir: the adapter's base model folder, when not the one recorded in adapter_config.json.
        ollama: for ``"gguf"``: also write a Modelfile for the first quantization when the chat format is known.
        overwrite: replace an existing non-empty ``out``.
        max_shard_bytes: for the merged methods: largest safetensors shard.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: an unknown method or quantization, ``"lora"`` from something that is not an adapter, or an
            adapter that does not fit its base.
        FileNotFoundError: the input folders or their files are missing.
        OutOfSpaceError: the disk cannot hold the output (the message names the space needed).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown export method {method!r}; choose one of {list(METHODS)}.")
    quants = [quantization] if isinstance(quantization, str) else list(quantization)
    if method == "gguf":
        if not quants:
            raise ValueError("method='gguf' needs at least one quantization, e.g. quantization=['q4_k_m'].")
        for name in quants:
            quant_type(name)  # fail before any work on an unknown name
    if is_model_object(model):
        if method == "lora" and not is_peft_model(model):
            raise ValueError("method='lora' needs a peft model (with a LoRA adapter); this is a plain model.")
        if method == "gguf" and tokenizer is None:
            raise ValueError("GGUF files embed the tokenizer: pass tokenizer= (the model's tokenizer or its folder).")
        source, folder = (None if method == "lora" else object_source(model)), None
    else:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Export source '{folder}' does not exist; pass a model, an adapter or a folder.")
        if method == "lora":
            if (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
                raise ValueError(f"method='lora' needs a peft adapter folder; '{folder}' is a full model.")
            load_adapter(folder)  # a clear error when it is not an adapter folder
            source = None
        else:
            if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"'{folder}' is neither a peft adapter folder nor a model folder with config.json."
                )
            source = folder_source(folder, base_dir)

    needed = None if source is None else source.output_bytes
    with atomic_directory(out, overwrite=overwrite, needed_bytes=needed) as staging:
        if method == "lora":
            _write_adapter(model, folder, staging)
            _write_tokenizer(tokenizer, folder, staging)
        elif method in ("merged_16bit", "merged_4bit"):
            write_merged(source, staging, four_bit=method == "merged_4bit", max_shard_bytes=max_shard_bytes)
            _write_tokenizer(tokenizer, None, staging)
        else:
            # The merged safetensors are an intermediate on disk, so memory stays at one tensor.
            merged = staging / ".merged"
            merged.mkdir()
            write_merged(source, merged, max_shard_bytes=max_shard_bytes)
            _write_tokenizer(tokenizer, None, merged)
            files = [write_gguf(merged, staging / f"model-{name.lower()}.gguf", quant=name) for name in quants]
            shutil.copy2(merged / "config.json", staging / "config.json")
            _copy_tokenizer_files(merged, staging)
            shutil.rmtree(merged)
            if ollama:
                _try_modelfile(staging, files[0])
    return Path(out)


def save_gguf(
    model,
    tokenizer=None,
    out: str | os.PathLike = "swiftune-output/gguf",
    quantization: str | list[str] = "q4_k_m",
    **kwargs,
) -> list[Path]:
    """Export a model (its LoRA adapter merged in) as GGUF, one file per quantization, with an Ollama Modelfile.

    Args:
        model: a transformers or peft model object, a peft LoRA adapter folder, or a full model folder.
        tokenizer: the tokenizer to embed (object or folder); None for the one in the input folder.
        out: the folder to create (``model-<quantization>.gguf`` files, config.json, tokenizer files, Modelfile).
        quantization: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k_s``,
            ``q4_k_m``, ``q5_k_s``, ``q5_k_m``, ``q6_k``, or a list of them.
        **kwargs: ``base_dir``, ``ollama``, ``overwrite`` as for :func:`save_merged`.

    Returns:
        The GGUF files written, in the order of ``quantization``.
    """
    quants = [quantization] if isinstance(quantization, str) else list(quantization)
    folder = save_merged(model, tokenizer, out, method="gguf", quantization=quants, **kwargs)
    return [folder / f"model-{name.lower()}.gguf" for name in quants]


def _write_adapter(model, folder: Path | None, staging: Path) -> None:
    if folder is None:
        model.save_pretrained(str(staging))  # peft writes adapter_config.json + adapter_model.safetensors
        return
    for name in _ADAPTER_FILES:
        shutil.copy2(folder / name, staging / name)


def _write_tokenizer(tokenizer, folder: Path | None, target: Path) -> None:
    """Ship ``tokenizer`` in ``target``; None keeps what is there (or copies the input folder's files)."""
    if tokenizer is None:
        if folder is not None:
            _copy_tokenizer_files(folder, target)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(target))
    else:
        source = Path(tokenizer).expanduser()
        if not (source / "tokenizer_config.json").is_file() and not (source / "tokenizer.json").is_file():
            raise FileNotFoundError(f"Tokenizer folder '{source}' has no tokenizer.json or tokenizer_config.json.")
        _copy_tokenizer_files(source, target)


def _copy_tokenizer_files(source: Path, target: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _try_modelfile(folder: Path, gguf_file: Path) -> None:
    try:
        write_modelfile(folder, gguf_file, tokenizer=folder)
    except ValueError as error:  # a chat format without an Ollama template: the GGUF files are still the export
        warnings.warn(f"No Ollama Modelfile written: {error}", stacklevel=3)
