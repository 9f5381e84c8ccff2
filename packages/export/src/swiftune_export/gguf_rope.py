"""RoPE in GGUF: base frequencies, scaling keys, and the per-frequency factor tensors llama.cpp reads.

transformers 5 keeps RoPE settings in ``rope_parameters`` (per layer type for models that mix sliding and full
attention, e.g. ``{"full_attention": {...}, "sliding_attention": {...}}``); transformers 4 configs kept
``rope_theta`` / ``rope_scaling`` at the top level. Both are read.
"""

from __future__ import annotations

import math

import gguf
import numpy as np


def rope_parameters(config: dict, layer_type: str = "full_attention") -> dict:
    """The RoPE settings of one layer type (``full_attention`` or ``sliding_attention``), {} when none are given."""
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "full_attention" in parameters or "sliding_attention" in parameters:
        return dict(parameters.get(layer_type) or {})
    return dict(parameters)


def rope_theta(config: dict, layer_type: str = "full_attention") -> float:
    """RoPE base of a layer type."""
    parameters = rope_parameters(config, layer_type)
    if layer_type == "sliding_attention" and "rope_theta" not in parameters and config.get("rope_local_base_freq"):
        return float(config["rope_local_base_freq"])
    return float(parameters.get("rope_theta") or config.get("rope_theta") or 10000.0)


def rope_kind(config: dict, layer_type: str = "full_attention") -> str:
    """The scaling kind ('default' when unscaled): linear, llama3, longrope, yarn..."""
    parameters = rope_parameters(config, layer_type)
    return parameters.get("rope_type", parameters.get("type", "default")) or "default"


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rotary_dim(config: dict) -> int:
    """Dimensions of each head that RoPE rotates (Phi-3 and others may rotate only a part)."""
    parameters = rope_parameters(config)
    factor = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return int(head_dim(config) * factor)


def add_rope_keys(writer: gguf.GGUFWriter, config: dict, supported: tuple[str, ...]) -> None:
    """Write the rope base and the scaling keys of the full-attention layers.

    Args:
        writer: the GGUF writer.
        config: the Hugging Face config.
        supported: scaling kinds this architecture's export handles besides 'default'.

    Raises:
        ValueError: a scaling kind that llama.cpp would not reproduce from what is written here.
    """
    writer.add_rope_dimension_count(rotary_dim(config))
    writer.add_rope_freq_base(rope_theta(config))
    kind = rope_kind(config)
    if kind == "default":
        return
    if kind not in supported:
        raise ValueError(
            f"RoPE scaling {kind!r} is not exported to GGUF for model_type {config.get('model_type')!r} by this "
            f"version (supported: {sorted(supported)}); export merged safetensors instead."
        )
    parameters = rope_parameters(config)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(parameters["factor"]))
    elif kind == "longrope":
        original = float(
            config.get("original_max_position_embeddings") or parameters["original_max_position_embeddings"]
        )
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(config))
    # llama3: carried by the rope_freqs tensor (llama3_rope_factors), no key.


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Per-frequency divisors of Llama-3.1-style RoPE scaling, which llama.cpp reads from a ``rope_freqs`` tensor.

    Frequencies whose wavelength is shorter than the original context / high_freq_factor are kept, longer than
    original context / low_freq_factor are divided by ``factor``, and those between are interpolated smoothly.
    """
    if rope_kind(config) != "llama3":
        return None
    scaling = rope_parameters(config)
    dim = head_dim(config)
    base = rope_theta(config)
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def longrope_factors(config: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """Phi-3's LongRoPE per-frequency divisors (long, short), which llama.cpp reads as two tensors.

    Raises:
        ValueError: factor lists of the wrong length.
    """
    if rope_kind(config) != "longrope":
        return None
    parameters = rope_parameters(config)
    long, short = (np.asarray(parameters[key], dtype=np.float32) for key in ("long_factor", "short_factor"))
    if long.shape != short.shape or long.shape[0] * 2 != rotary_dim(config):
        raise ValueError(
            f"LongRoPE factors must each have {rotary_dim(config) // 2} entries (half the rotary dimension); "
            f"got {long.shape[0]} and {short.shape[0]}."
        )
    return long, short


def longrope_attention_factor(config: dict) -> float:
    """The cos/sin scale of LongRoPE: sqrt(1 + ln(scale) / ln(original context)) for a context scaled up, where
    scale is the config's ``factor`` or else max_position_embeddings / original_max_position_embeddings."""
    parameters = rope_parameters(config)
    if parameters.get("attention_factor") is not None:
        return float(parameters["attention_factor"])
    original = float(config.get("original_max_position_embeddings") or parameters["original_max_position_embeddings"])
    scale = float(parameters.get("factor") or config["max_position_embeddings"] / original)
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
