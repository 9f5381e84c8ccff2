"""What each supported architecture needs in a GGUF file: llama.cpp's architecture, its hyperparameter keys, its
tensor names, and the changes llama.cpp's graph expects of the weights.

One table, ``ARCHITECTURES``, keyed by the Hugging Face ``model_type``: every architecture of the loader's fast
path, plus Cohere (Command-R). Tensor names come from gguf's own ``TensorNameMap`` (llama.cpp's table), so that
they cannot drift from what llama.cpp reads. The per-architecture facts restate llama.cpp's converter
(convert_hf_to_gguf.py) and model loader (src/models/<arch>.cpp):

- llama, mistral, granite: llama.cpp rotates adjacent pairs, Hugging Face the two halves of each head, so q/k rows
  (and biases) are reordered. Qwen, Gemma and Phi-3 rotate halves in llama.cpp too (NEOX), Cohere adjacent pairs in
  both: no reordering there.
- Gemma 1/2/3 norms compute ``x * (1 + w)``; llama.cpp computes ``x * w``, so the file stores ``1 + w``.
- Gemma 1/2 and Command-R always reuse the token embedding as the output head (no ``output.weight``).
- Gemma 2/3 scale queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B models), whatever
  ``query_pre_attn_scalar`` says; Gemma 2 soft-caps attention and final logits; both mark their sliding layers.
- Phi-3 keeps its fused ``qkv_proj`` and ``gate_up_proj`` (gate first), as llama.cpp splits them itself.
- Command-R scales the logits (``logit_scale``) and uses LayerNorm; its q/k norms are read only for 64+ layers.
- Granite scales embeddings, residuals, attention and logits by its four multipliers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gguf
import numpy as np

from swiftune_export.gguf_rope import add_rope_keys, head_dim, rope_theta

A = gguf.MODEL_ARCH


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one Hugging Face ``model_type`` is written.

    Attributes:
        arch: llama.cpp's architecture enum (its name is the key prefix, e.g. ``llama.block_count``).
        permute_qk: reorder q_proj/k_proj rows from Hugging Face's rotate-half RoPE layout to llama.cpp's
            interleaved one.
        norm_offset: added to every ``*norm.weight`` (1.0 for Gemma's ``1 + w`` norms).
        ties_output: llama.cpp always uses the token embedding as the output head; an untied lm_head is refused.
        rope_scalings: RoPE scaling kinds exported besides the default.
        add_keys: writes the architecture's own hyperparameter keys.
        check: raises ValueError for configs whose behaviour llama.cpp would not reproduce.
    """

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_offset: float = 0.0
    ties_output: bool = False
    rope_scalings: tuple[str, ...] = ("linear",)
    add_keys: Callable[[gguf.GGUFWriter, dict], None] | None = None
    check: Callable[[dict], None] | None = field(default=None)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _attention_scale_check(config: dict) -> None:
    """Gemma 2/3: llama.cpp's query scale is fixed by model size; the config must ask for the same one."""
    scalar = config.get("query_pre_attn_scalar")
    if scalar is None:
        return
    layers = config["num_hidden_layers"]
    is_27b = layers == {"gemma2": 46, "gemma3_text": 62}.get(config["model_type"])
    expected = config["hidden_size"] // config["num_attention_heads"] if is_27b else head_dim(config)
    if int(scalar) != expected:
        raise ValueError(
            f"query_pre_attn_scalar={scalar} but llama.cpp scales queries by 1/sqrt({expected}) for this "
            f"{config['model_type']} shape; such a GGUF would compute different attention. Export safetensors instead."
        )


def _sliding_window_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    if config.get("layer_types"):
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config["layer_types"]])


def _gemma2_check(config: dict) -> None:
    _attention_scale_check(config)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is None:
            raise ValueError(f"Gemma 2 without {key} cannot be written as GGUF: llama.cpp always applies soft-capping.")


def _gemma2_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    _sliding_window_keys(writer, config)


def _gemma3_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_rope_freq_base_swa(rope_theta(config, "sliding_attention"))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    _sliding_window_keys(writer, config)


def _gemma3_check(config: dict) -> None:
    _attention_scale_check(config)
    if config.get("attn_logit_softcapping"):
        raise ValueError("Gemma 3 with attention soft-capping cannot be written as GGUF: llama.cpp's Gemma 3 has none.")


def _phi3_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    # llama.cpp reads 0 as "no sliding window" for this architecture (and currently runs Phi-3 without one).
    writer.add_sliding_window(int(config.get("sliding_window") or 0))


def _cohere_check(config: dict) -> None:
    if config.get("use_qk_norm") and config["num_hidden_layers"] < 64:
        raise ValueError(
            "Cohere with use_qk_norm and fewer than 64 layers cannot be written as GGUF: llama.cpp's Command-R reads "
            "q/k norms only for 64+ layer models."
        )


def _cohere_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_logit_scale(float(config.get("logit_scale", 1.0)))


def _granite_check(config: dict) -> None:
    if config.get("head_dim") and config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
        raise ValueError("Granite with head_dim != hidden_size / num_attention_heads is not supported by llama.cpp.")


def _granite_keys(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_attention_scale(float(config.get("attention_multiplier", 0.0)))
    writer.add_embedding_scale(float(config.get("embedding_multiplier", 1.0)))
    writer.add_residual_scale(float(config.get("residual_multiplier", 1.0)))
    writer.add_logit_scale(float(config.get("logits_scaling", 1.0)))


# Mistral is written as "llama", as llama.cpp's own converter does: the graphs are the same (llama.cpp has no
# sliding window for it, nor does its converter write one).
ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(A.LLAMA, permute_qk=True, rope_scalings=("linear", "llama3")),
    "mistral": GGUFArchitecture(A.LLAMA, permute_qk=True, rope_scalings=("linear", "llama3")),
    "qwen2": GGUFArchitecture(A.QWEN2),
    "qwen3": GGUFArchitecture(A.QWEN3),
    "gemma": GGUFArchitecture(A.GEMMA, norm_offset=1.0, ties_output=True, rope_scalings=()),
    "gemma2": GGUFArchitecture(
        A.GEMMA2, norm_offset=1.0, ties_output=True, rope_scalings=(), add_keys=_gemma2_keys, check=_gemma2_check
    ),
    "gemma3_text": GGUFArchitecture(A.GEMMA3, norm_offset=1.0, add_keys=_gemma3_keys, check=_gemma3_check),
    "phi3": GGUFArchitecture(A.PHI3, rope_scalings=("longrope",), add_keys=_phi3_keys),
    "cohere": GGUFArchitecture(
        A.COMMAND_R, ties_output=True, rope_scalings=(), add_keys=_cohere_keys, check=_cohere_check
    ),
    "granite": GGUFArchitecture(A.GRANITE, permute_qk=True, add_keys=_granite_keys, check=_granite_check),
}

# Buffers some checkpoints save that are recomputed at load time; they have no GGUF tensor.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def architecture_for(config: dict) -> GGUFArchitecture:
    """The GGUF architecture of a Hugging Face config, after checking that llama.cpp would run it as transformers does.

    Raises:
        ValueError: the model type has no GGUF writer here, or a setting llama.cpp cannot express.
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        hint = " (a Gemma 3 with vision: export its text model, Gemma3ForCausalLM)" if model_type == "gemma3" else ""
        raise ValueError(
            f"GGUF export supports model_type {sorted(ARCHITECTURES)}, not {model_type!r}{hint}; export merged "
            "safetensors (method='merged_16bit') and convert them with llama.cpp's convert_hf_to_gguf.py instead."
        )
    architecture = ARCHITECTURES[model_type]
    if architecture.ties_output and config.get("tie_word_embeddings") is False:
        raise ValueError(
            f"{model_type} with an untied lm_head cannot be written as GGUF: llama.cpp's {architecture.name} always "
            "reuses the token embedding as the output head."
        )
    if architecture.check is not None:
        architecture.check(config)
    return architecture


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict, architecture: GGUFArchitecture, vocab_size: int) -> None:
    """Write the ``<arch>.*`` keys llama.cpp reads to build the graph."""
    heads = config["num_attention_heads"]
    context = config.get("model_max_length") if config.get("model_type") == "cohere" else None
    writer.add_context_length(int(context or config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    if head_dim(config) != config["hidden_size"] // heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if "layer_norm_eps" in config and "rms_norm_eps" not in config:
        writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    else:
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab_size)
    add_rope_keys(writer, config, architecture.rope_scalings)
    if architecture.add_keys is not None:
        architecture.add_keys(writer, config)


def gguf_tensor_name(name_map: gguf.TensorNameMap, hf_name: str, architecture: GGUFArchitecture) -> str | None:
    """llama.cpp's name for a Hugging Face weight, or None for tensors that GGUF does not store.

    Raises:
        ValueError: a weight that llama.cpp's table does not know (its graph would not use it).
    """
    if hf_name.endswith(_SKIPPED_SUFFIXES):
        return None
    if architecture.ties_output and hf_name == "lm_head.weight":
        return None  # a saved copy of the tied embedding (architecture_for refused untied heads)
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ValueError(f"Weight '{hf_name}' has no llama.cpp name; this checkpoint is not a plain supported model.")
    return gguf_name


def for_llama_cpp(hf_name: str, array: np.ndarray, config: dict, architecture: GGUFArchitecture) -> np.ndarray:
    """The tensor as llama.cpp's graph expects it: q/k rows reordered, Gemma norms offset."""
    if architecture.norm_offset and hf_name.endswith("norm.weight"):
        return array + np.float32(architecture.norm_offset)
    if not architecture.permute_qk:
        return array
    heads = config["num_attention_heads"]
    if ".self_attn.q_proj." in hf_name:
        return permute_for_llama_rope(array, heads)
    if ".self_attn.k_proj." in hf_name:
        return permute_for_llama_rope(array, config.get("num_key_value_heads") or heads)
    return array


def permute_for_llama_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of q_proj (n_heads = attention heads) or k_proj (n_heads = key/value heads), or their bias.

    Hugging Face rotates the two halves of each head (x[i] with x[i + d/2]); llama.cpp's Llama rotates adjacent
    pairs (x[2i] with x[2i+1]). Interleaving the halves' rows makes both compute the same attention scores.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
