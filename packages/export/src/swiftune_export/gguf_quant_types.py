"""The GGUF quantization types this package writes: their names, llama.cpp file types, and how to quantize one tensor.

gguf's numpy ``quantize`` covers the float types and Q4_0..Q8_0; the K-quants are ours (``kquants``).
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
        qtype: the ggml type of the 2-D weights.
        file_type: llama.cpp's ``general.file_type`` for a file that is mostly ``qtype``.
    """

    qtype: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


QUANT_TYPES = {
    "f32": QuantType(Q.F32, F.ALL_F32),
    "f16": QuantType(Q.F16, F.MOSTLY_F16),
    "bf16": QuantType(Q.BF16, F.MOSTLY_BF16),
    "q8_0": QuantType(Q.Q8_0, F.MOSTLY_Q8_0),
    "q4_0": QuantType(Q.Q4_0, F.MOSTLY_Q4_0),
    "q4_1": QuantType(Q.Q4_1, F.MOSTLY_Q4_1),
    "q5_0": QuantType(Q.Q5_0, F.MOSTLY_Q5_0),
    "q5_1": QuantType(Q.Q5_1, F.MOSTLY_Q5_1),
    # Every 2-D weight in the one K-type: llama.cpp calls such files *_S ("small"), unlike its mixed *_M recipes.
    "q4_k": QuantType(Q.Q4_K, F.MOSTLY_Q4_K_S),
    "q5_k": QuantType(Q.Q5_K, F.MOSTLY_Q5_K_S),
    "q6_k": QuantType(Q.Q6_K, F.MOSTLY_Q6_K),
}

_KQUANTS = {Q.Q4_K: kquants.quantize_q4_k, Q.Q5_K: kquants.quantize_q5_k, Q.Q6_K: kquants.quantize_q6_k}


def quant_type(name: str) -> QuantType:
    """Look up a quantization by name (case-insensitive).

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    key = name.lower()
    if key not in QUANT_TYPES:
        raise ValueError(f"Unknown GGUF quantization {name!r}; choose one of {sorted(QUANT_TYPES)}.")
    return QUANT_TYPES[key]


def tensor_type(requested: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
    """The type one tensor is stored in.

    1-D tensors (norms, biases, rope factors) stay F32, as llama.cpp keeps them. A weight whose rows are not a whole
    number of blocks falls back to Q8_0 (blocks of 32) when it fits, else F16.
    """
    if len(shape) < 2:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[requested][0]
    if shape[-1] % block == 0:
        return requested
    return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16


def tensor_nbytes(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` stored as ``qtype``."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def quantize(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Encode a float32 array as ``qtype`` (float types keep their shape; block types become uint8 rows)."""
    if qtype in _KQUANTS:
        return _KQUANTS[qtype](array)
    return gguf.quants.quantize(array, qtype)
