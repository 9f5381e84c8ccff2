"""Where the tensors to export come from: a folder (an adapter and its base, or a full model) or a model object.

Both give the same thing, a :class:`MergeSource`: the base model's tensors in checkpoint naming (a stream, read one
tensor at a time from a folder), the LoRA adapter when there is one, and how to write config.json and the files that
go beside the weights. Model objects are read through their own methods (``state_dict``, ``config``,
``peft_config``, ``save_pretrained``), so this module imports neither transformers nor peft; where transformers
renames weights between checkpoint and loaded model (vision-language models), :mod:`swiftune_export.checkpoint_names`
translates with transformers' own mapping.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from swiftune_export.checkpoint_names import checkpoint_name_function, loaded_name_function
from swiftune_export.merge import _TOKENIZER_FILES, check_lora_config, load_adapter
from swiftune_export.safetensors_files import header_bytes, iter_tensors, weight_files


@dataclass
class MergeSource:
    """A model to export.

    Attributes:
        tensors: returns a fresh stream of the base model's (name, tensor), 4-bit weights still packed.
        config: the base model's config.json as a dict.
        write_side_files: writes config.json, generation_config.json and the tokenizer files into a folder.
        adapter_config: the LoRA adapter's config, or None for a model without an adapter.
        adapter: the adapter's tensors in peft's saved naming, or None.
        linear_weights: names of the weights of linear layers that 4-bit export quantizes; None when only the
            checkpoint's names are known (``nf4.is_linear_weight_name`` decides then).
        output_bytes: the expected size of 16-bit merged weights, for the free-space check.
        loaded_name: maps a base tensor name to the name the adapter knows it by, when the adapter was saved from a
            model that transformers renamed on load (vision-language models); None when the names are the same.
        saved_name: maps a tensor name to the one written in the output, the checkpoint naming transformers'
            ``save_pretrained`` uses; None to write the names as they are.
    """

    tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]]
    config: dict
    write_side_files: Callable[[Path], None]
    adapter_config: dict | None = None
    adapter: dict[str, torch.Tensor] | None = None
    linear_weights: set[str] | None = None
    output_bytes: int | None = None
    loaded_name: Callable[[str], str] | None = None
    saved_name: Callable[[str], str] | None = None


def is_model_object(model) -> bool:
    """A transformers or peft model object (rather than a folder path)."""
    return not isinstance(model, str | os.PathLike) and hasattr(model, "state_dict") and hasattr(model, "config")


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _four_bit(config: dict) -> bool:
    quantization = config.get("quantization_config") or {}
    return bool(quantization.get("load_in_4bit") or quantization.get("_load_in_4bit"))


def check_quantization(config: dict, where: str) -> None:
    """Refuse quantized weights other than bitsandbytes 4-bit, which this package cannot turn back into floats.

    Raises:
        ValueError: 8-bit bitsandbytes, GPTQ, AWQ and other quantized weights.
    """
    quantization = config.get("quantization_config") or {}
    method = str(quantization.get("quant_method", "bitsandbytes")).split(".")[-1].lower().replace("_", "")
    if not quantization or (method == "bitsandbytes" and _four_bit(config)):
        return
    kind = "8 bits" if quantization.get("load_in_8bit") or quantization.get("_load_in_8bit") else method
    raise ValueError(
        f"{where} is stored quantized ({kind}), which this export cannot read back into 16-bit weights (only "
        "bitsandbytes 4-bit can); export from the 16-bit model it was quantized from (base_dir= for an adapter)."
    )


def folder_source(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> MergeSource:
    """A peft LoRA adapter folder (with its base) or a full model folder.

    Raises:
        FileNotFoundError: the folder, its base or their files are missing.
        ValueError: a base stored in 8 bits, or an adapter this merge does not support.
    """
    path = Path(path).expanduser()
    if (path / "adapter_config.json").is_file() or not (path / "config.json").is_file():
        adapter_config, adapter = load_adapter(path)
        recorded = adapter_config.get("base_model_name_or_path") or ""
        base = Path(base_dir if base_dir is not None else recorded).expanduser()
        if not (base / "config.json").is_file():
            raise FileNotFoundError(
                f"Base model folder '{base}' not found (or has no config.json); pass base_dir= the model the adapter "
                "was trained on."
            )
    else:
        adapter_config, adapter, base = None, None, path
    config = json.loads((base / "config.json").read_text())
    check_quantization(config, f"The base model '{base}'")
    files = weight_files(base)
    size = header_bytes(files) * (4 if _four_bit(config) else 1)  # 4-bit codes take a quarter of 16-bit weights
    # The adapter folder's tokenizer is the one training used (it may hold repairs); else the base one.
    tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else base

    def write_side_files(target: Path) -> None:
        for name in ("config.json", "generation_config.json"):
            if (base / name).is_file():
                shutil.copy2(base / name, target / name)
        for name in _TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, target / name)

    loaded_name = None if adapter is None else _adapter_naming(config, files, adapter)
    return MergeSource(
        lambda: iter_tensors(files), config, write_side_files, adapter_config, adapter, None, size, loaded_name
    )


def _adapter_naming(config: dict, files: list[Path], adapter: dict[str, torch.Tensor]) -> Callable[[str], str] | None:
    """How the base checkpoint's names map to the adapter's: None when the adapter uses the checkpoint's own names,
    else transformers' load-time renaming (read from the safetensors headers, without loading any tensor)."""
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    wanted = {_adapter_weight_name(key) for key in adapter}
    if wanted <= names:
        return None
    return loaded_name_function(config)


def _adapter_weight_name(key: str) -> str:
    """The base weight of an adapter tensor: ``base_model.model.<module>.lora_A.weight`` -> ``<module>.weight``."""
    key = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            return key.split(part)[0] + ".weight"
    return key


def object_source(model) -> MergeSource:
    """A transformers model, or a peft model over one (its active LoRA adapter is merged).

    Raises:
        ValueError: a peft adapter that is not LoRA, or a model whose weights are on the meta device.
    """
    adapter_config = adapter = None
    base = model
    if is_peft_model(model):
        name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        peft_config = model.peft_config[name]
        adapter_config = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(vars(peft_config))
        check_lora_config(adapter_config)
        base = model.get_base_model()
        adapter = _adapter_tensors(base.state_dict(), name)
    else:
        name = "default"
    config = base.config.to_dict()
    check_quantization(config, "The model")
    if any(t.is_meta for t in base.state_dict().values()):
        raise ValueError("The model has weights on the meta device (offloaded); load it fully before exporting.")
    linear = {_checkpoint_name(n, name) + ".weight" for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    linear -= {_checkpoint_name(n, name) + ".weight" for n, m in base.named_modules() if m is output}
    size = sum(t.numel() * (4 if t.dtype == torch.uint8 else t.element_size()) for _, t in _base_tensors(base, name))

    def write_side_files(target: Path) -> None:
        base.config.save_pretrained(str(target))
        saved = json.loads((target / "config.json").read_text())
        saved.setdefault("architectures", [type(base).__name__])
        (target / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
        generation = getattr(base, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(str(target))

    return MergeSource(
        lambda: _base_tensors(base, name),
        config,
        write_side_files,
        adapter_config,
        adapter,
        linear,
        size,
        saved_name=checkpoint_name_function(base),
    )


def _checkpoint_name(name: str, adapter_name: str) -> str:
    """A module or tensor name without peft's wrapper parts (``base_layer``, ``modules_to_save.<adapter>``)."""
    return name.replace(".base_layer", "").replace(f".modules_to_save.{adapter_name}", "")


def _base_tensors(base, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The base weights in checkpoint naming; LoRA tensors and peft's originals of modules_to_save left out, and
    a tied output head (the embedding's own tensor again) left out as save_pretrained does."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or "lora_magnitude_vector" in name or ".original_module." in name:
            continue
        if tensor.is_floating_point() and tensor.ndim == 2:
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
        yield _checkpoint_name(name, adapter_name), tensor


def _adapter_tensors(state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors from the peft model's state dict, named as peft saves them."""
    adapter = {}
    for name, tensor in state.items():
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            marker = f".{part}.{adapter_name}"
            if marker in name:
                saved = name.replace(marker, f".{part}")
                adapter[f"base_model.model.{_checkpoint_name(saved, adapter_name)}"] = tensor
    return adapter
