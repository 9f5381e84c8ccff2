"""Training on several processes (torchrun / accelerate): who is the main process, FSDP2 sharding, gathered saves.

DDP needs nothing from here: the Trainer wraps the model, and swiftune's fused loss runs through the wrapper (see
:func:`swiftune_loader.patching.causal_lm_loss.runs_through_own_forward`). FSDP2 shards a model that does not fit
on one device: :func:`fsdp2_wrap` shards each decoder layer and the root, and :func:`save_sharded_adapter` gathers
the LoRA adapter onto rank 0 to write it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


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

    Args:
        model: a transformers causal LM, or a peft model wrapping one; it is changed in place.
        mesh: the device mesh to shard over; by default all processes, on this process's device type.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (e.g. bf16 parameters, fp32 gradient reduction), or None.
        reshard_after_forward: free each layer's gathered weights after its forward (less memory, one more
            all-gather in backward).

    Returns:
        ``model``, now an ``FSDPModule``.

    Raises:
        ValueError: no process group is initialized, or the decoder layers cannot be found.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "fsdp2_wrap needs a process group: start the script with torchrun (or `swiftune train --num-gpus N`)."
        )
    options = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if mesh is not None:
        options["mesh"] = mesh
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place: the folder is complete or absent.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # peft keeps the adapter's entries of the state dict it is given, instead of reading the sharded model.
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
