"""What a model folder holds, read without loading its weights: the config, a model built on the meta device (no
memory), and the safetensors headers."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelFacts:
    """The facts ``swiftune inspect`` and ``--dry-run`` report.

    Attributes:
        path: the model folder.
        model_type: transformers' model type (``llama``, ``qwen2``, ...).
        architecture: the model class named in config.json.
        fast_path: swiftune has a fast path (fused kernels) for this model type.
        parameters: number of parameters (tied weights counted once).
        stored_dtype: the dtype most of the stored weights have (e.g. ``BF16``).
        quantization: how the stored weights are quantized, or None.
        hidden_size, num_layers, vocab_size: from the config.
        max_positions: ``max_position_embeddings`` (None when the config has none).
        linear_layers: ``(name, in_features, out_features)`` of every linear layer.
    """

    path: Path
    model_type: str
    architecture: str
    fast_path: bool
    parameters: int
    stored_dtype: str
    quantization: str | None
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_positions: int | None = None
    linear_layers: list[tuple[str, int, int]] = field(default_factory=list)


def read_model_facts(model_name: str | os.PathLike | None) -> ModelFacts:
    """Read the facts of a local model folder (None: the bundled default model).

    Raises:
        FileNotFoundError: not a model folder.
        ValueError: an architecture that transformers does not know, or that is not a causal language model.
    """
    import torch

    from swiftune_loader import resolve_model_path
    from swiftune_loader.architectures import spec_for

    path = resolve_model_path(model_name)
    model = meta_model(path)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    linear = [
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    return ModelFacts(
        path=path,
        model_type=config.model_type,
        architecture=(config.architectures or [type(model).__name__])[0],
        fast_path=spec_for(config.model_type) is not None,
        parameters=sum(p.numel() for p in model.parameters()),
        stored_dtype=_stored_dtype(path),
        quantization=_quantization(getattr(config, "quantization_config", None)),
        hidden_size=text_config.hidden_size,
        num_layers=text_config.num_hidden_layers,
        vocab_size=text_config.vocab_size,
        max_positions=getattr(text_config, "max_position_embeddings", None),
        linear_layers=linear,
    )


def meta_model(path: Path):
    """The model of a folder's config.json built on the meta device: its structure, with no memory for weights.

    Raises:
        ValueError: transformers does not know the architecture, or it is not a causal language model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"transformers cannot read the config of '{path}' ({reason}).") from None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError:
        raise ValueError(f"'{path}' holds a {config.model_type} model, which is not a causal language model.") from None


def lora_parameter_count(facts: ModelFacts, r: int, target_modules: list[str] | None) -> tuple[int, list[str]]:
    """Trainable LoRA parameters (``r * (in + out)`` per adapted layer) and the layer names adapted.

    ``target_modules`` None means the loader's defaults that the model has; ``["all-linear"]`` every linear layer
    but the output head.

    Raises:
        ValueError: no linear layer matches the targets.
    """
    from swiftune_loader.fast_language_model import DEFAULT_LORA_TARGETS

    suffixes = {name.rsplit(".", 1)[-1] for name, _, _ in facts.linear_layers}
    if target_modules is None:
        targets = [t for t in DEFAULT_LORA_TARGETS if t in suffixes]
    elif target_modules == ["all-linear"]:
        targets = sorted(suffixes - {"lm_head"})
    else:
        targets = list(target_modules)
    chosen = [(n, i, o) for n, i, o in facts.linear_layers if n.rsplit(".", 1)[-1] in targets and n != "lm_head"]
    if not chosen:
        raise ValueError(
            f"No linear layer of this model matches the LoRA targets {targets}; its linear layers are named "
            f"{', '.join(sorted(suffixes))}."
        )
    return sum(r * (i + o) for _, i, o in chosen), sorted({n.rsplit(".", 1)[-1] for n, _, _ in chosen})


def _stored_dtype(path: Path) -> str:
    from safetensors import safe_open

    elements: Counter = Counter()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                count = 1
                for size in piece.get_shape():
                    count *= size
                elements[piece.get_dtype()] += count
    return elements.most_common(1)[0][0] if elements else "unknown"


def _quantization(config) -> str | None:
    if not config:
        return None
    config = config if isinstance(config, dict) else config.to_dict()
    method = config.get("quant_method", "unknown")
    if config.get("load_in_4bit"):
        return f"{method} 4-bit ({config.get('bnb_4bit_quant_type', 'nf4')})"
    if config.get("load_in_8bit"):
        return f"{method} 8-bit"
    return str(method)


def format_count(n: int) -> str:
    """``43.2K``, ``135.0M``, ``1.2B``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
