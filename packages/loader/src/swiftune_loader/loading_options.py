"""Checking and translating from_pretrained's options: quantization, full fine-tuning, checkpointing, tokenizer fix.

Every check runs before anything is loaded, so a mistake costs nothing and says what to do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from swiftune_loader.checkpointing import is_memory_aware

logger = logging.getLogger(__name__)

# What use_gradient_checkpointing accepts: off, transformers' checkpointing, or swiftune's offloaded checkpointing.
CHECKPOINTING_CHOICES = (True, False, "offload")


def check_loading_options(
    max_seq_length,
    load_in_4bit: bool,
    load_in_8bit: bool,
    full_finetuning: bool,
    use_gradient_checkpointing,
    fix_tokenizer,
) -> None:
    """Raise a ValueError (TypeError for a wrong type) naming the option and the fix, before anything loads."""
    if max_seq_length is None or int(max_seq_length) <= 0:
        raise ValueError(f"max_seq_length must be a positive number of tokens, got {max_seq_length}.")
    if load_in_4bit and load_in_8bit:
        raise ValueError("Choose one of load_in_4bit and load_in_8bit, not both.")
    if full_finetuning and (load_in_4bit or load_in_8bit):
        raise ValueError(
            "full_finetuning trains every weight and cannot use quantized weights; drop load_in_4bit / load_in_8bit."
        )
    check_gradient_checkpointing(use_gradient_checkpointing)
    if fix_tokenizer is True:
        raise ValueError(
            "fix_tokenizer=True needs swiftune-tokenizers-fix, which swiftune_loader does not import: load through "
            "`swiftune.FastLanguageModel` (it passes the fixer), or pass a callable (model, tokenizer) -> tokenizer."
        )
    if fix_tokenizer is not False and fix_tokenizer is not None and not callable(fix_tokenizer):
        raise TypeError(
            f"fix_tokenizer must be False or a callable (model, tokenizer) -> tokenizer, got {fix_tokenizer!r}."
        )


def check_gradient_checkpointing(value) -> None:
    """Accept True, False, "offload", "auto" or a memory budget in GiB; anything else is a ValueError listing them."""
    if not (value is True or value is False or value == "offload" or is_memory_aware(value)):
        raise ValueError(
            f"use_gradient_checkpointing must be True, False, 'offload', 'auto' or a GiB budget, got {value!r}: True "
            "recomputes each decoder layer in backward, 'offload' also parks its input in CPU memory, 'auto' (or a "
            "number of GiB) checkpoints only as many layers as the free GPU memory requires, False keeps every "
            "activation."
        )


def apply_tokenizer_fix(fix_tokenizer: Callable | bool | None, model, tokenizer):
    """The tokenizer after ``fix_tokenizer(model, tokenizer)``, or as it is when no fixer was given."""
    if not fix_tokenizer:
        return tokenizer
    fixed = fix_tokenizer(model, tokenizer)
    if fixed is None:
        raise ValueError("fix_tokenizer returned None; it must return the (fixed) tokenizer.")
    return fixed


def weight_dtype(compute_dtype: torch.dtype, full_finetuning: bool) -> torch.dtype:
    """The dtype to hold the weights in.

    Full fine-tuning updates every weight with the optimizer: float16 weights lose small updates (and torch's
    GradScaler refuses float16 gradients), so they are kept in float32 and float16 is left to mixed precision
    (``fp16=True`` in the training arguments). bfloat16 and float32 stay as asked. Adapter training keeps the
    compute dtype: the frozen base weights are never updated.
    """
    if full_finetuning and compute_dtype == torch.float16:
        logger.warning(
            "full_finetuning with float16: weights are kept in float32 (float16 weights cannot take optimizer "
            "updates); train with fp16=True mixed precision, or use bfloat16."
        )
        return torch.float32
    return compute_dtype


def stored_quantization(config) -> str | None:
    """How the checkpoint's own weights are quantized ("4bit", "8bit", or another method's name), or None."""
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return None
    stored = stored if isinstance(stored, dict) else stored.to_dict()
    if stored.get("load_in_4bit") or stored.get("_load_in_4bit"):
        return "4bit"
    if stored.get("load_in_8bit") or stored.get("_load_in_8bit"):
        return "8bit"
    return str(stored.get("quant_method", "unknown"))


def check_stored_quantization(stored: str | None, load_in_4bit: bool, load_in_8bit: bool, full_finetuning: bool):
    """Refuse options a pre-quantized checkpoint cannot honour (its weights stay as they were saved)."""
    if stored is None:
        return
    if full_finetuning:
        raise ValueError(
            f"This checkpoint is pre-quantized ({stored}) and cannot be fully fine-tuned; load its 16-bit "
            "repository (the name table maps it when load_in_4bit=False) or add LoRA adapters instead."
        )
    if (stored == "4bit" and load_in_8bit) or (stored == "8bit" and load_in_4bit):
        asked = "load_in_8bit" if load_in_8bit else "load_in_4bit"
        raise ValueError(
            f"This checkpoint is pre-quantized ({stored}); {asked} cannot re-quantize it: load it with "
            f"load_in_{stored}=True, or load its 16-bit repository."
        )


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the options: NF4 with double quantization, or int8; None for neither."""
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant_storage_dtype(compute_dtype),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def quant_storage_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype that holds NF4's packed bytes: uint8, or the compute dtype under torchrun (WORLD_SIZE > 1).

    FSDP2 shards floating-point parameters of one dtype; stored as the compute dtype, the packed bytes shard with the
    rest of a layer, so QLoRA runs under FSDP2 with no change to the user's code. The bytes are the same either way
    (swiftune's NF4 kernel reads them as bytes), so DDP and single-GPU runs are unaffected.
    """
    return compute_dtype if int(os.environ.get("WORLD_SIZE", "1")) > 1 else torch.uint8


def bitsandbytes_problem(device: str) -> str | None:
    """Why bitsandbytes cannot quantize on ``device`` ("cpu", "cuda", ...), or None when it can.

    Importing is not enough (a wheel without the device's backend imports and fails later), so a tiny tensor is
    quantized to NF4 and back on the device.
    """
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except Exception as error:  # ImportError, or a backend library that fails to load
        return f"bitsandbytes cannot be imported ({type(error).__name__}: {error})"
    try:
        sample = torch.linspace(-1.0, 1.0, 64, device=device)
        packed, state = quantize_4bit(sample, quant_type="nf4")
        dequantize_4bit(packed, state)
    except Exception as error:
        return f"bitsandbytes cannot quantize on {device} ({type(error).__name__}: {error})"
    return None


def require_bitsandbytes(device: str, what: str) -> None:
    """Raise a RuntimeError saying what to do when bitsandbytes cannot run on ``device``."""
    problem = bitsandbytes_problem(device)
    if problem is not None:
        raise RuntimeError(
            f"{what} needs bitsandbytes, and {problem}; install a bitsandbytes build for this machine "
            "(pip install -U bitsandbytes), or load in 16-bit with load_in_4bit=False and load_in_8bit=False."
        )


def target_device(device_map) -> str:
    """The device type the weights go to under ``device_map`` (as resolved by precision.resolve_device_map)."""
    if isinstance(device_map, dict) and len(device_map) == 1:
        (placement,) = device_map.values()
        if isinstance(placement, int):
            return "cuda"
        return str(torch.device(placement).type)
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "balanced", "sequential"):
        return str(torch.device(device_map).type)
    return "cuda" if torch.cuda.is_available() else "cpu"
