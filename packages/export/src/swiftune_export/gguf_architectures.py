"""What each supported architecture needs in a GGUF file: llama.cpp's architecture name, its hyperparameter keys,
its tensor names and the q/k row permutation llama.cpp's Llama graph expects.

One table, ``ARCHITECTURES``, keyed by the Hugging Face ``model_type``. Tensor names come from gguf's own
``TensorNameMap`` (llama.cpp's table), so that they cannot drift from what llama.cpp reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one Hugging Face ``model_type`` is written.

    Attributes:
        arch: llama.cpp's architecture enum (its name is the key prefix, e.g. ``llama.block_count``).
        permute_qk: reorder q_proj/k_proj rows from Hugging Face's rotate-half RoPE layout to llama.cpp's
            interleaved one (Llama's graph uses interleaved pairs; Qwen2's uses NeoX halves, like Hugging Face).
    """

    arch: gguf.MODEL_ARCH
    permute_qk: bool

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# Mistral is written as "llama", as llama.cpp's own converter does: the graphs are the same.
ARCHITECTURES = {
    "llama": GGUFArchitecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": GGUFArchitecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": GGUFArchitecture(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}

# Buffers some checkpoints save that are recomputed at load time; they have no GGUF tensor.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def architecture_for(config: dict) -> GGUFArchitecture:
    """The GGUF architecture of a Hugging Face config.

    Raises:
        ValueError: the model type has no GGUF writer here.
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"GGUF export supports model_type {sorted(ARCHITECTURES)}, not {model_type!r}; export merged safetensors "
            "(method='merged_16bit') and convert them with llama.cpp's convert_hf_to_gguf.py instead."
        )
    return ARCHITECTURES[model_type]


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict, vocab_size: int) -> None:
    """Write the ``<arch>.*`` keys llama.cpp reads to build the graph."""
    heads = config["num_attention_heads"]
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config["hidden_size"] // heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab_size)
    _add_rope_scaling(writer, config)


def rope_theta(config: dict) -> float:
    """RoPE base: top-level in transformers 4 configs, inside ``rope_parameters`` in transformers 5 ones."""
    parameters = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or parameters.get("rope_theta") or 10000.0)


def rope_scaling(config: dict) -> dict | None:
    """The config's RoPE scaling, or None when it has none (transformers 5 may spell 'default' in rope_parameters)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


def _add_rope_scaling(writer: gguf.GGUFWriter, config: dict) -> None:
    scaling = rope_scaling(config)
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "llama3":
        pass  # carried by the rope_freqs tensor, see llama3_rope_factors
    else:
        raise ValueError(f"RoPE scaling {kind!r} is not exported to GGUF by this version; only linear and llama3.")


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Per-frequency divisors of Llama-3.1-style RoPE scaling, which llama.cpp reads from a ``rope_freqs`` tensor.

    Frequencies whose wavelength is shorter than the original context / high_freq_factor are kept, longer than
    original context / low_freq_factor are divided by ``factor``, and those between are interpolated smoothly.
    """
    scaling = rope_scaling(config)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
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


def gguf_tensor_name(name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face weight, or None for buffers that GGUF does not store.

    Raises:
        ValueError: a weight that llama.cpp's table does not know (its graph would not use it).
    """
    if hf_name.endswith(_SKIPPED_SUFFIXES):
        return None
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ValueError(f"Weight '{hf_name}' has no llama.cpp name; this checkpoint is not a plain supported model.")
    return gguf_name


def permute_for_llama_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of q_proj (n_heads = attention heads) or k_proj (n_heads = key/value heads).

    Hugging Face rotates the two halves of each head (x[i] with x[i + d/2]); llama.cpp's Llama rotates adjacent
    pairs (x[2i] with x[2i+1]). Interleaving the halves' rows makes both compute the same attention scores.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
