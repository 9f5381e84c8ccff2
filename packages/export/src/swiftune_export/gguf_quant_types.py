"""The GGUF quantizations this package writes: their names, llama.cpp file types, and how to encode one tensor.

A name is a *recipe* as llama.cpp's ``llama-quantize`` understands it (``q4_k_m``, ``q8_0``...): a default type for
the 2-D weights plus per-tensor exceptions (``gguf_mixes``). gguf's numpy ``quantize`` covers the float types and
Q4_0..Q8_0; the K-quants are ours (``kquants``).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from swiftune_export import kquants

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class QuantType:
    """A user-facing quantization name.

    Attributes:
        name: the canonical name (``"q4_k_m"``), used in file names.
        qtype: the ggml type of most 2-D weights.
        file_type: llama.cpp's ``general.file_type`` for the recipe; ``gguf_mixes`` keys its exceptions on it.
    """

    name: str
    qtype: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType

    @property
    def is_float(self) -> bool:
        return self.qtype in (Q.F32, Q.F16, Q.BF16)


QUANT_TYPES = {
    quant.name: quant
    for quant in (
        QuantType("f32", Q.F32, F.ALL_F32),
        QuantType("f16", Q.F16, F.MOSTLY_F16),
        QuantType("bf16", Q.BF16, F.MOSTLY_BF16),
        QuantType("q8_0", Q.Q8_0, F.MOSTLY_Q8_0),
        QuantType("q4_0", Q.Q4_0, F.MOSTLY_Q4_0),
        QuantType("q4_1", Q.Q4_1, F.MOSTLY_Q4_1),
        QuantType("q5_0", Q.Q5_0, F.MOSTLY_Q5_0),
        QuantType("q5_1", Q.Q5_1, F.MOSTLY_Q5_1),
        QuantType("q4_k_s", Q.Q4_K, F.MOSTLY_Q4_K_S),
        QuantType("q4_k_m", Q.Q4_K, F.MOSTLY_Q4_K_M),
        QuantType("q5_k_s", Q.Q5_K, F.MOSTLY_Q5_K_S),
        QuantType("q5_k_m", Q.Q5_K, F.MOSTLY_Q5_K_M),
        QuantType("q6_k", Q.Q6_K, F.MOSTLY_Q6_K),
    )
}
# llama-quantize accepts the bare K names as the small recipes; so do we.
_ALIASES = {"q4_k": "q4_k_s", "q5_k": "q5_k_s"}

_KQUANTS = {Q.Q4_K: kquants.quantize_q4_k, Q.Q5_K: kquants.quantize_q5_k, Q.Q6_K: kquants.quantize_q6_k}


def quant_type(name: str) -> QuantType:
    """Look up a quantization by name (case-insensitive).

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in QUANT_TYPES:
        raise ValueError(f"Unknown GGUF quantization {name!r}; choose one of {sorted(QUANT_TYPES)}.")
    return QUANT_TYPES[key]


def block_size(qtype: gguf.GGMLQuantizationType) -> int:
    """Values per block of ``qtype`` (1 for the float types)."""
    return gguf.GGML_QUANT_SIZES[qtype][0]


def tensor_nbytes(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` stored as ``qtype``."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def quantize(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Encode a float32 array as ``qtype`` (float types keep their shape; block types become uint8 rows)."""
    if qtype in _KQUANTS:
        return _KQUANTS[qtype](array)
    return gguf.quants.quantize(array, qtype)
