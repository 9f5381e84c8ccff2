"""NF4 (bitsandbytes 4-bit) weights: read them back to floats for merging, and write merged weights as NF4.

A bitsandbytes 4-bit weight ``X.weight`` is stored (in a state dict or a safetensors checkpoint) as packed uint8
codes plus its quantization state beside it: ``X.weight.absmax``, ``X.weight.quant_map``, for double quantization
``X.weight.nested_absmax`` and ``X.weight.nested_quant_map``, and a small JSON tensor
``X.weight.quant_state.bitsandbytes__nf4`` (shape, block size, dtype). bitsandbytes (CPU is enough) does the
arithmetic; it is imported only when an NF4 weight is met or written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import torch

_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_JSON_PREFIX = "quant_state.bitsandbytes__"


def _bitsandbytes():
    try:
        import bitsandbytes.functional as functional
    except ImportError as error:  # pragma: no cover - bitsandbytes is installed with swiftune-loader
        raise ImportError(
            "This model holds 4-bit (bitsandbytes) weights: install bitsandbytes (pip install bitsandbytes, or "
            "swiftune-export[loader]) to merge or write them."
        ) from error
    return functional


def _split(name: str) -> tuple[str, str] | None:
    """('X.weight', suffix) for a quantization-state tensor of X.weight, else None."""
    for suffix in _STATE_SUFFIXES:
        if name.endswith(".weight." + suffix):
            return name[: -len(suffix) - 1], suffix
    if ".weight." + _JSON_PREFIX in name:
        weight, _, rest = name.partition(".weight.")
        return weight + ".weight", rest
    return None


class DequantizedTensors:
    """Iterate (name, tensor) with every bitsandbytes 4-bit weight replaced by its float weight.

    Tensors pass through one at a time; a 4-bit weight is held back only until its quantization state (which
    follows it in both state-dict and safetensors order) is complete. ``quantized`` collects the names of the
    weights that were 4-bit, and ``quantization`` their settings, for writing them back as 4-bit.
    """

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]]):
        self._tensors = tensors
        self.quantized: set[str] = set()
        self.quant_type: str | None = None
        self.double_quant = False
        self.compute_dtype: torch.dtype | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self._tensors:
            part = _split(name)
            if part is not None:
                weight, suffix = part
                pending.setdefault(weight, {})[suffix] = tensor
            elif tensor.dtype == torch.uint8 and name.endswith(".weight"):
                pending.setdefault(name, {})["codes"] = tensor
                weight = name
            else:
                yield name, tensor
                continue
            if self._complete(pending[weight]):
                yield weight, self._dequantize(weight, pending.pop(weight))
        for weight, parts in pending.items():
            if set(parts) != {"codes"}:
                raise ValueError(f"The 4-bit weight '{weight}' is incomplete: found only {sorted(parts)}.")
            yield weight, parts["codes"]  # a plain uint8 weight, not a 4-bit one

    @staticmethod
    def _complete(parts: dict[str, torch.Tensor]) -> bool:
        state = next((v for k, v in parts.items() if k.startswith(_JSON_PREFIX)), None)
        if state is None or not {"codes", "absmax", "quant_map"} <= set(parts):
            return False
        nested = "nested_offset" in _state_json(state)
        return not nested or {"nested_absmax", "nested_quant_map"} <= set(parts)

    def _dequantize(self, weight: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        functional = _bitsandbytes()
        codes = parts.pop("codes")
        state = functional.QuantState.from_dict(parts, device=torch.device("cpu"))
        self.quantized.add(weight)
        self.quant_type = state.quant_type
        self.double_quant = state.nested
        self.compute_dtype = state.dtype
        return functional.dequantize_4bit(codes.to("cpu"), state)


def _state_json(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))


def quantize_nf4(name: str, weight: torch.Tensor, double_quant: bool = True, quant_type: str = "nf4"):
    """The tensors that store ``weight`` as bitsandbytes 4-bit under ``name`` (a list of (name, tensor)).

    The weight is quantized in its own dtype, which the quantization state records as the dtype to dequantize to.
    """
    functional = _bitsandbytes()
    codes, state = functional.quantize_4bit(
        weight.contiguous(),
        blocksize=64,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
    )
    return [(name, codes)] + [(f"{name}.{key}", value) for key, value in state.as_dict(packed=True).items()]


def quantization_config(
    compute_dtype: torch.dtype, double_quant: bool = True, quant_type: str = "nf4", skip=None
) -> dict:
    """The ``quantization_config`` of config.json with which transformers loads the 4-bit weights written here
    (the fields of transformers' ``BitsAndBytesConfig.to_dict()``)."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
    }


def is_linear_weight_name(name: str) -> bool:
    """Whether a checkpoint weight is one that transformers quantizes to 4 bits: the 2-D ``.weight`` of a linear
    layer inside the decoder blocks (embeddings, the output head and norms stay in 16 bits). Used when only the
    checkpoint's names are known; for a model object the module types decide."""
    return ".layers." in name and name.endswith(".weight") and "norm" not in name.rsplit(".", 2)[-2]
