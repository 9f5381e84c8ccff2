"""Merging a LoRA adapter into its base model's weights, streamed tensor by tensor, into safetensors.

W' = W + scale * B @ A, computed in float32 and cast back to the base dtype, where scale = lora_alpha / r
(or lora_alpha / sqrt(r) with rsLoRA). Only one base tensor and the adapter are in memory at a time, plus the
output shard being filled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from swiftune_export.atomic import atomic_directory
from swiftune_export.safetensors_files import ShardedWriter, iter_tensors, weight_files

# Files copied from the adapter (or base) folder so that the merged folder is self-contained.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias"}


def load_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a peft LoRA adapter folder: its config and its tensors.

    Raises:
        FileNotFoundError: the folder or its files are missing.
        ValueError: the adapter is not a LoRA adapter this merge supports.
    """
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"Adapter folder '{adapter_dir}' does not exist.")
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"'{adapter_dir}' is not a LoRA adapter folder: it needs adapter_config.json and adapter_model.safetensors."
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"Only LoRA adapters can be merged, this one is {config.get('peft_type')}.")
    for key, name in _UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"Adapters trained with {name} cannot be merged by this version yet.")
    return config, load_file(str(weights_path))


def lora_scale(config: dict, module_name: str) -> float:
    """The LoRA scale of one module, honouring per-module rank and alpha patterns."""
    rank = _per_module(config.get("rank_pattern") or {}, module_name, config["r"])
    alpha = _per_module(config.get("alpha_pattern") or {}, module_name, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _per_module(pattern: dict, module_name: str, default):
    for key, value in pattern.items():
        if module_name == key or module_name.endswith("." + key):
            return value
    return default


def _group_adapter(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Map base-model weight names to their {"A", "B"} LoRA tensors, and collect modules_to_save tensors."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        key = name.removeprefix("base_model.model.")
        if ".lora_A." in key or ".lora_B." in key:
            module, which = (key.split(".lora_A.")[0], "A") if ".lora_A." in key else (key.split(".lora_B.")[0], "B")
            pairs.setdefault(module, {})[which] = tensor
        elif ".lora_embedding_" in key:
            raise ValueError("Adapters on embedding layers cannot be merged by this version yet.")
        else:
            # modules_to_save are stored whole; their names lose peft's wrapper part.
            full[key.replace(".modules_to_save.default", "")] = tensor
    return pairs, full


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write the base model with the LoRA adapter merged in, as sharded safetensors that plain transformers loads.

    Args:
        adapter_dir: a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
        out_dir: the folder to create; it appears complete or not at all.
        base_dir: the base model folder; defaults to the adapter config's ``base_model_name_or_path``.
        max_shard_bytes: largest safetensors shard.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileNotFoundError: the adapter, the base model or their files are missing.
        ValueError: the adapter does not fit the base model.
    """
    adapter_dir = Path(adapter_dir).expanduser()
    config, adapter = load_adapter(adapter_dir)
    base_dir = Path(base_dir if base_dir is not None else config.get("base_model_name_or_path") or "").expanduser()
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"Base model folder '{base_dir}' not found (or has no config.json); pass base_dir= the model the adapter "
            "was trained on."
        )
    files = weight_files(base_dir)
    pairs, full = _group_adapter(adapter)
    remaining = set(pairs)
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        writer = ShardedWriter(staging, max_shard_bytes)
        for name, tensor in iter_tensors(files):
            module = name.removesuffix(".weight")
            if name in full:
                tensor = full.pop(name).to(tensor.dtype)
            elif name.endswith(".weight") and module in pairs:
                tensor = _merged(tensor, pairs[module], lora_scale(config, module), name)
                remaining.discard(module)
            writer.add(name, tensor)
        writer.close()
        missing = sorted(remaining) + sorted(full)
        if missing:
            raise ValueError(f"The adapter has weights for modules the base model lacks: {missing[:5]}.")
        _copy_side_files(base_dir, adapter_dir, staging)
    return Path(out_dir)


def _merged(weight: torch.Tensor, pair: dict[str, torch.Tensor], scale: float, name: str) -> torch.Tensor:
    if set(pair) != {"A", "B"}:
        raise ValueError(f"LoRA weights of {name} are incomplete: found only {sorted(pair)}.")
    a, b = pair["A"].to(torch.float32), pair["B"].to(torch.float32)
    if weight.shape != (b.shape[0], a.shape[1]):
        raise ValueError(
            f"LoRA shapes {tuple(b.shape)} @ {tuple(a.shape)} do not fit {name} of shape {tuple(weight.shape)}."
        )
    return (weight.to(torch.float32) + scale * (b @ a)).to(weight.dtype)


def _copy_side_files(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    # The adapter folder's tokenizer is the one training used (it may hold repairs); else the base one.
    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
