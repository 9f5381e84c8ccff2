"""Merging a LoRA adapter into its base model's weights, streamed tensor by tensor, into safetensors.

W' = W + scale * B @ A, computed in float32 and cast back to the base dtype, where scale = lora_alpha / r
(or lora_alpha / sqrt(r) with rsLoRA). Only one base tensor and the adapter are in memory at a time, plus the
output shard being filled. 4-bit bases are dequantized first (``nf4``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

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
    check_lora_config(config)
    from swiftune_export.safetensors_files import check_complete  # a cut-off file: a message naming it and the fix

    return config, load_file(str(check_complete(weights_path)))


def check_lora_config(config: dict) -> None:
    """Refuse adapters this merge does not support.

    Raises:
        ValueError: not a LoRA adapter, or a LoRA variant (DoRA, LoRA bias) that is not merged here.
    """
    if str(config.get("peft_type", "LORA")).split(".")[-1] != "LORA":
        raise ValueError(f"Only LoRA adapters can be merged, this one is {config.get('peft_type')}.")
    for key, name in _UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"Adapters trained with {name} cannot be merged by this version yet.")


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


def merged_tensors(
    base: Iterable[tuple[str, torch.Tensor]],
    config: dict,
    adapter: dict[str, torch.Tensor],
    loaded_name: Callable[[str], str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the base model's tensors with the LoRA adapter merged in, one tensor at a time.

    Args:
        base: (name, tensor) of the base model in checkpoint naming (4-bit weights already dequantized).
        config: the adapter's config (adapter_config.json as a dict).
        adapter: the adapter's tensors in peft's saved naming (``base_model.model.<module>.lora_A.weight``).
        loaded_name: maps a base tensor name to the loaded model's name, which the adapter uses (transformers 5
            renames vision-language checkpoints on load); None when both namings are the same. The tensors keep
            their base names.

    Raises:
        ValueError: the adapter does not fit the base model (checked as the stream ends).
    """
    pairs, full = _group_adapter(adapter)
    remaining = set(pairs)
    for name, tensor in base:
        key = _adapter_key(name, pairs, full, loaded_name)
        module = key.removesuffix(".weight")
        if key in full:
            tensor = full.pop(key).to(tensor.dtype)
        elif key.endswith(".weight") and module in pairs:
            tensor = _merged(tensor, pairs[module], lora_scale(config, module), name)
            remaining.discard(module)
        yield name, tensor
    missing = sorted(remaining) + sorted(full)
    if missing:
        raise ValueError(f"The adapter has weights for modules the base model lacks: {missing[:5]}.")


def _adapter_key(name: str, pairs: dict, full: dict, loaded_name: Callable[[str], str] | None) -> str:
    """The name of base tensor ``name`` in the adapter's naming: its own when the adapter uses it, else the loaded
    model's (an adapter saved from a model whose weights were renamed on load)."""
    if loaded_name is None or name in full or name.removesuffix(".weight") in pairs:
        return name
    return loaded_name(name)


def _merged(weight: torch.Tensor, pair: dict[str, torch.Tensor], scale: float, name: str) -> torch.Tensor:
    if set(pair) != {"A", "B"}:
        raise ValueError(f"LoRA weights of {name} are incomplete: found only {sorted(pair)}.")
    a, b = pair["A"].to(torch.float32), pair["B"].to(torch.float32)
    if weight.shape != (b.shape[0], a.shape[1]):
        raise ValueError(
            f"LoRA shapes {tuple(b.shape)} @ {tuple(a.shape)} do not fit {name} of shape {tuple(weight.shape)}."
        )
    return (weight.to(torch.float32) + scale * (b @ a)).to(weight.dtype)
