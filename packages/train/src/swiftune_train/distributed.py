"""Training on several processes (torchrun / accelerate): who is the main process, FSDP2 sharding, gathered saves.

DDP needs nothing from here: the Trainer wraps the model, and swiftune's fused loss runs through the wrapper (see
:func:`swiftune_loader.patching.causal_lm_loss.runs_through_own_forward`). FSDP2 shards a model that does not fit
on one device: :func:`fsdp2_wrap` shards each decoder layer and the root, and :func:`save_sharded_adapter` gathers
the LoRA adapter onto rank 0 to write it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from swiftune_loader.staged_folder import staged_folder


def process_rank() -> int:
    """This process's global rank: from the process group, else from torchrun's ``RANK`` variable, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def process_count() -> int:
    """The number of training processes: from the process group, else torchrun's ``WORLD_SIZE``, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process is rank 0, the one that prints progress and writes files (True without torchrun)."""
    return process_rank() == 0


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (through a peft wrapper): the units FSDP shards one at a time.

    They are the modules whose class the model names in ``_no_split_modules`` (``LlamaDecoderLayer``, ...).

    Raises:
        ValueError: the model names no such class, or none of its modules is one.
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in base.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(
            f"Cannot find the decoder layers of {type(base).__name__} (no module of a class in _no_split_modules "
            f"{sorted(names)}); shard it with torch.distributed.fsdp.fully_shard yourself."
        )
    return layers


def fsdp2_wrap(model: torch.nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True):
    """Shard ``model`` with FSDP2 (``fully_shard``): each decoder layer is one unit, the rest (embeddings, final norm,
    lm_head) the root unit. Call it in every process after the process group is initialized.

    FSDP2 keeps frozen and trained parameters of one unit apart, so a LoRA model (peft wrapper included) shards
    as it is, adapters inside their layer's unit. The root stays gathered between forward and backward, so
    swiftune's fused loss reads the whole lm_head weight.

    QLoRA: bitsandbytes 4-bit weights (``Params4bit``) are packed bytes of shape ``(n, 1)``, so they shard by rows
    like any tensor; their ``quant_state`` (block scales, a few percent of the bytes) stays whole on every process,
    kept by the ``Linear4bit`` module. The weight FSDP2 gathers for a forward is a plain tensor without it, so a
    hook gives it back before each unit's forward (swiftune's fused LoRA kernels read ``weight.quant_state``).
    The packed weights may be stored as uint8 or, as FSDP-ready QLoRA loads them, as bf16
    (``BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16)``). On the CPU keep such a model in train mode:
    in eval mode bitsandbytes repacks 4-bit weights in place for its CPU kernel, under the storage FSDP2 manages.

    Args:
        model: a transformers causal LM, or a peft model wrapping one; it is changed in place.
        mesh: the device mesh to shard over; by default all processes, on this process's device type.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (e.g. bf16 parameters, fp32 gradient reduction), or None.
        reshard_after_forward: free each layer's gathered weights after its forward (less memory, one more
            all-gather in backward).

    Returns:
        ``model``, now an ``FSDPModule``.

    Raises:
        ValueError: no process group is initialized, the decoder layers cannot be found, or ``mp_policy`` would
            cast packed 4-bit weights stored in another float dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "fsdp2_wrap needs a process group: start the script with torchrun (or `swiftune train --num-gpus N`)."
        )
    mp_policy = mp_policy or MixedPrecisionPolicy()
    check_4bit_storage(model, mp_policy.param_dtype)
    options = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy}
    if mesh is not None:
        options["mesh"] = mesh
    units = [*decoder_layers(model), model]
    for unit in units:
        fully_shard(unit, **options)
    claimed: set[torch.nn.Module] = set()
    for unit in units:  # layers first: the root's hook takes only the 4-bit layers outside every decoder layer
        quantized = [module for module in unit.modules() if _is_4bit_linear(module) and module not in claimed]
        claimed.update(quantized)
        if quantized:
            # Registered after fully_shard's own pre-hook (which FSDP2 prepends), so it sees the gathered weights.
            unit.register_forward_pre_hook(_QuantStateRestorer(quantized))
    return model


def _is_4bit_linear(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (known by its class, without importing bitsandbytes)."""
    return any(cls.__name__ == "Linear4bit" and "bitsandbytes" in cls.__module__ for cls in type(module).__mro__)


def check_4bit_storage(model: torch.nn.Module, param_dtype: torch.dtype | None) -> None:
    """Refuse a mixed-precision cast that would corrupt packed 4-bit weights.

    FSDP2 casts every parameter of a unit to ``param_dtype`` when it gathers them; packed NF4 bytes stored as
    bf16 (``bnb_4bit_quant_storage``) and cast to another float dtype are other bytes.

    Raises:
        ValueError: a bitsandbytes 4-bit weight is stored in a float dtype other than ``param_dtype``.
    """
    if param_dtype is None:
        return
    for name, param in model.named_parameters():
        if type(param).__name__ == "Params4bit" and param.dtype.is_floating_point and param.dtype != param_dtype:
            raise ValueError(
                f"{name} holds packed 4-bit weights stored as {param.dtype}, which MixedPrecisionPolicy(param_dtype="
                f"{param_dtype}) would cast; load the model with bnb_4bit_quant_storage={param_dtype} or leave "
                "param_dtype None."
            )


class _QuantStateRestorer:
    """Forward pre-hook of an FSDP2 unit: gives each gathered 4-bit weight its module's ``quant_state`` back."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules

    def __call__(self, unit, args):
        for module in self.modules:
            weight, quant_state = module.weight, getattr(module, "quant_state", None)
            # Never on a shard: the state dict would then name the quant_state's tensors, which shards lack.
            is_shard = type(weight).__name__ == "DTensor"
            if quant_state is not None and not is_shard and getattr(weight, "quant_state", None) is None:
                weight.quant_state = quant_state


def gather_full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a model sharded by FSDP2, on the CPU of rank 0; empty on other ranks.

    Every process must call it (it gathers). ``trainable_only`` keeps the parameters that train (a LoRA adapter),
    so that the frozen base is never gathered whole.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def save_sharded_adapter(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path | None:
    """Gather the trained LoRA adapter of an FSDP2-sharded peft model and write it from rank 0 (safetensors).

    Every process must call it. The folder is what ``PeftModel.from_pretrained`` reads on one process.

    Args:
        model: a peft model sharded by :func:`fsdp2_wrap` (or FSDP2 through accelerate).
        out_dir: the adapter folder to write.
        tokenizer: saved beside the adapter when given.

    Returns:
        The folder on rank 0, None on the other ranks.

    Raises:
        ValueError: ``model`` is not a peft model.
    """
    if not callable(getattr(model, "get_base_model", None)):
        raise ValueError("save_sharded_adapter saves a peft (LoRA) adapter; gather_full_state_dict gives full weights.")
    state_dict = gather_full_state_dict(model, trainable_only=True)
    if not is_main_process():
        return None
    out_dir = Path(out_dir)
    with staged_folder(out_dir) as staging:  # the folder is complete or absent
        # peft keeps the adapter's entries of the state dict it is given, instead of reading the sharded model.
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return out_dir
