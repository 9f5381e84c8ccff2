"""Switching gradient checkpointing on and off on a transformers model: transformers' own, swiftune's offloaded
checkpointing (each decoder layer's input parked in pinned CPU memory until backward), or a memory-aware plan
("auto", or a budget in GiB) that checkpoints only as many layers as memory requires."""

from __future__ import annotations

import os

import torch

from swiftune_kernels import apply_offloaded_checkpointing
from swiftune_kernels.offload_host_copy import (
    HOST_OFFLOAD_FRACTION,
    available_host_bytes,
)
from swiftune_loader.memory_plan import (
    layer_memory,
    loss_bytes_per_token,
    plan_checkpointing,
    step_reserve_bytes,
)

# "auto" leaves this fraction of the device's memory unplanned: allocator fragmentation and kernels' workspaces.
AUTO_HEADROOM = 0.08


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The decoder layers of a transformers causal LM (``model.model.layers``), or None when it has none."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def enable_checkpointing(model, mode) -> None:
    """Turn on checkpointing ``mode`` (True, "offload" or False) on the transformers ``model`` (not a peft wrapper).

    "offload" checkpoints each decoder layer and moves its input to pinned CPU memory where the input is large
    enough for that to pay (swiftune_kernels.checkpoint_policy); the layer is recomputed either way. A model with
    no decoder layers to wrap falls back to transformers' checkpointing.
    """
    if not mode:
        return
    layers = decoder_layers(model)
    if is_memory_aware(mode):
        if layers is None:
            raise ValueError(f"use_gradient_checkpointing={mode!r} needs a model with decoder layers; use True.")
        model._swiftune_offload = MemoryAwareCheckpointing(model, layers, mode)
        return
    if mode == "offload" and layers is not None:
        model._swiftune_offload = apply_offloaded_checkpointing(layers, policy="auto")
        return
    # Newer transformers 5 releases renamed gradient_* to activation_* (the old names warn). Either one also makes
    # the embeddings' output require grad, so that backward reaches checkpointed layers when embeddings are frozen.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _swiftune_handle(model, option: str):
    """The handle of swiftune's checkpointing on ``model`` (the plan's inner one for a memory-aware mode), or a
    ValueError that says ``option`` needs it."""
    handle = model.__dict__.get("_swiftune_offload")
    if handle is None:
        raise ValueError(
            f'{option} works on swiftune\'s checkpointed layers; use use_gradient_checkpointing="offload", '
            '"auto" or a GiB budget with it (True and False do not checkpoint through swiftune).'
        )
    return getattr(handle, "handle", handle)


def replay_from_cuda_graphs(model) -> None:
    """Replay the checkpointed decoder layers of ``model`` (forward, and recompute with backward) from CUDA graphs
    (:mod:`swiftune_kernels.layer_graphs`): the host issues one replay a layer instead of hundreds of launches, so a
    step no longer waits for the host. Needs swiftune's checkpointing ("offload", "auto" or a GiB budget)."""
    _swiftune_handle(model, "cuda_graphs").cuda_graphs = True


def park_for_recompute(model) -> None:
    """Let the layers of ``model`` whose input is offloaded also park the fused LoRA MLP's gate (and, without CUDA
    graphs, up) in host memory for their recompute, instead of computing them again
    (:mod:`swiftune_kernels.recompute_parking`, :mod:`swiftune_kernels.slot_parking`). Needs swiftune's
    checkpointing ("offload", "auto" or a GiB budget)."""
    _swiftune_handle(model, "park_intermediates").park_intermediates = True


def disable_checkpointing(model):
    """Turn off whichever checkpointing is on; returns the mode that was on (True, "offload" or False)."""
    offload = model.__dict__.pop("_swiftune_offload", None)
    if offload is not None:
        offload.revert()
        return getattr(offload, "mode", "offload")
    if transformers_checkpointing(model):
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        if getattr(model, "_require_grads_hooks", None):
            model.disable_input_require_grads()
        return True
    return False


def transformers_checkpointing(model) -> bool:
    """Whether transformers' own gradient checkpointing is on for ``model``."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def is_memory_aware(mode) -> bool:
    """Whether ``mode`` asks for a memory plan: "auto", or a positive number of GiB for the activations."""
    if isinstance(mode, str):
        return mode == "auto"
    return isinstance(mode, (int, float)) and not isinstance(mode, bool) and mode > 0


class MemoryAwareCheckpointing:
    """Checkpoints only as many decoder layers as the memory requires; re-plans when the tokens per step change.

    Every layer gets swiftune's checkpointing wrapper; before each training forward of the decoder, a hook reads
    the tokens of the batch and sets each layer's mode from :func:`swiftune_loader.memory_plan.plan_checkpointing`:
    un-checkpointed (fastest), recomputed, or offloaded to the host. The budget for activations is ``mode`` GiB,
    or with "auto" the device memory that is free (to PyTorch's allocator too) less what the step needs besides
    (gradients, AdamW states, one layer's recompute, the loss) and a headroom of :data:`AUTO_HEADROOM`.
    On the CPU "auto" plans against the free host memory.
    """

    def __init__(self, model, layers: torch.nn.ModuleList, mode) -> None:
        self.mode = mode
        self.model = model
        self.num_layers = len(layers)
        self.handle = apply_offloaded_checkpointing(layers, policy="recompute")
        self.plans: dict[int, list[str]] = {}
        decoder = getattr(model, "model", None)
        self.hook = decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module, args, kwargs):
        if not torch.is_grad_enabled() or not self.model.training:
            return None
        tokens = _tokens_of(args, kwargs)
        if tokens is None:
            return None
        if tokens not in self.plans:
            self.plans[tokens] = self.plan(tokens, _device_of(self.model))
        self.handle.set_modes(self.plans[tokens])
        return None

    def plan(self, tokens: int, device: torch.device) -> list[str]:
        """The per-layer modes for ``tokens`` per step on ``device``."""
        config = self.model.config
        embed = self.model.get_input_embeddings()
        residual = embed.weight.element_size() if embed is not None else 2
        memory = layer_memory(config, compute_bytes=2, residual_bytes=max(2, residual))
        if self.mode == "auto":
            trainable = sum(p.numel() * 4 for p in self.model.parameters() if p.requires_grad)
            reserve = step_reserve_bytes(trainable, memory, tokens, loss_bytes_per_token(config))
            budget = free_device_bytes(device) - reserve
        else:
            budget = float(self.mode) * 2**30
        return plan_checkpointing(
            self.num_layers,
            tokens,
            memory,
            budget,
            can_offload=device.type == "cuda",
            host_budget_bytes=HOST_OFFLOAD_FRACTION * available_host_bytes(),
        )

    @property
    def modes(self) -> list[str]:
        return self.handle.modes

    def revert(self) -> None:
        self.hook.remove()
        self.handle.revert()


def free_device_bytes(device: torch.device) -> float:
    """Bytes that can still be allocated on ``device``, less :data:`AUTO_HEADROOM` of its total."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached - AUTO_HEADROOM * total
    try:
        pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return (1 - AUTO_HEADROOM) * pages * page_size
    except (ValueError, OSError, AttributeError):
        return float("inf")


def _tokens_of(args, kwargs) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return int(ids.numel())
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor):
        return int(embeds.shape[:-1].numel())
    return None


def _device_of(model) -> torch.device:
    return next(model.parameters()).device
