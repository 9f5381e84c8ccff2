"""Which ggml type each tensor gets under a quantization recipe, following llama.cpp's ``llama-quantize``.

A recipe such as Q4_K_M is not "every weight in Q4_K": llama.cpp spends more bits where the error costs most.
The rules below restate the choice made in llama.cpp's ``src/llama-quant.cpp`` (``llama_tensor_get_type``) for
the recipes written here, for dense (non-MoE) models:

- Norms, biases and other 1-D tensors stay F32; so does any weight named ``*_norm.weight`` (Cohere's 2-D q/k norms).
- The output projection, or the token embedding when the model ties it to the output, takes Q6_K in every
  quantized recipe except Q8_0 (which keeps Q8_0), and Q8_0 when its rows are not whole 256-blocks.
- The value projection (``attn_v``, or the fused ``attn_qkv``) and ``ffn_down`` take Q6_K in Q4_K_M and Q5_K_M on
  the layers ``use_more_bits`` picks: the first and last eighth of the layers and every third layer between.
  Q4_K_S gives Q5_K to ``attn_v`` of the first 4 layers and to ``ffn_down`` of the first eighth. A 70B-class
  model (80 layers) keeps ``attn_v`` at least Q5_K.
- A type whose block does not divide the row length falls back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; a
  32-block type that still does not fit becomes F16.

llama.cpp counts ``attn_v`` tensors in file order; here the layer index in the tensor name is used, which is the
same count for files written in layer order (as these are).
"""

from __future__ import annotations

import re

import gguf

from swiftune_export.gguf_quant_types import QuantType, block_size

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# Rows of 256 for the K-quants: a K-type that does not fit gives way to the 32-block type of about as many bits.
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of layers that get more bits: the first and last eighth and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def stays_float32(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama.cpp never quantizes: 1-D ones, norms, and anything that is not a ``.weight``."""
    return len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight")


def choose_types(
    tensors: list[tuple[str, tuple[int, ...]]], quant: QuantType, n_layers: int
) -> dict[str, gguf.GGMLQuantizationType]:
    """The type of every tensor of a model under ``quant``.

    Args:
        tensors: (GGUF tensor name, shape in numpy order, i.e. rows first) of every tensor of the file.
        quant: the recipe.
        n_layers: the model's block count.

    Returns:
        GGUF tensor name -> ggml type.
    """
    names = {name for name, _ in tensors}
    tied = "output.weight" not in names
    return {name: _choose(name, shape, quant, n_layers, tied) for name, shape in tensors}


def _choose(
    name: str, shape: tuple[int, ...], quant: QuantType, n_layers: int, tied: bool
) -> gguf.GGMLQuantizationType:
    if stays_float32(name, shape):
        return Q.F32
    if quant.is_float:
        return quant.qtype
    columns = shape[-1]
    chosen = quant.qtype
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    layer_match = _LAYER.match(name)
    layer = int(layer_match.group(1)) if layer_match else -1
    if is_output:
        if columns % block_size(quant.qtype):
            chosen = Q.Q8_0
        elif quant.qtype != Q.Q8_0:
            chosen = Q.Q6_K
    elif name.endswith(("attn_v.weight", "attn_qkv.weight")):
        chosen = _value_type(quant, layer, n_layers)
    elif name.endswith("ffn_down.weight"):
        chosen = _ffn_down_type(quant, layer, n_layers)
    return _fit_rows(chosen, columns)


def _value_type(quant: QuantType, layer: int, n_layers: int) -> gguf.GGMLQuantizationType:
    chosen = quant.qtype
    if quant.file_type in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(layer, n_layers):
        chosen = Q.Q6_K
    elif quant.file_type == F.MOSTLY_Q4_K_S and layer < 4:
        chosen = Q.Q5_K
    if n_layers == 80 and chosen == Q.Q4_K:  # llama.cpp's 70B class: attn_v is 8x smaller than attn_q there
        chosen = Q.Q5_K
    return chosen


def _ffn_down_type(quant: QuantType, layer: int, n_layers: int) -> gguf.GGMLQuantizationType:
    if quant.file_type in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(layer, n_layers):
        return Q.Q6_K
    if quant.file_type == F.MOSTLY_Q4_K_S and layer < n_layers // 8:
        return Q.Q5_K
    return quant.qtype


def _fit_rows(chosen: gguf.GGMLQuantizationType, columns: int) -> gguf.GGMLQuantizationType:
    if columns % block_size(chosen) == 0:
        return chosen
    fallback = _FALLBACK.get(chosen, chosen)
    return fallback if columns % block_size(fallback) == 0 else Q.F16
