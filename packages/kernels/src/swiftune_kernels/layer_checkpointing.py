"""Wrapping decoder layers in offloaded checkpointing: :func:`apply_offloaded_checkpointing`, the handle it returns,
and the per-layer stand-in for ``forward`` that checkpoints the original (:mod:`swiftune_kernels.offloaded_checkpoint`)
in the mode a memory plan gives it, optionally parking intermediates (:mod:`swiftune_kernels.recompute_parking`) or
replaying the layer from CUDA graphs (:mod:`swiftune_kernels.layer_graphs`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from swiftune_kernels.layer_graphs import (
    LayerGraphs,
    adapter_state,
    draws_random_numbers,
    global_hooks,
    has_inner_hooks,
    lora_modules,
    parameter_slots,
)
from swiftune_kernels.offloaded_checkpoint import POLICIES, _checkpoint
from swiftune_kernels.slot_parking import LayerParking

# Keyword arguments through which transformers layers write a KV cache: a recompute would write it twice.
_CACHE_KWARGS = {"use_cache": False, "past_key_values": None, "past_key_value": None, "layer_past": None}

# Bumped whenever a module or parameter is registered on a module inside a checkpointed layer (adapters added,
# weights replaced), so that a layer's parameter list, walked once, is walked again only after such a change. The
# hooks are global and installed on the first use of apply_offloaded_checkpointing, not at import. Registrations
# elsewhere are ignored: transformers slices its layer list on every forward (`self.layers[:n]` builds a new
# ModuleList, registering every layer into it), which would otherwise force a walk of every layer on every step.
_STRUCTURE = {"generation": 0, "hooked": False}
# The modules of the checkpointed layers, as found by their last walk. A module attached since then is found through
# its registration on one of these (which bumps the generation), and is watched from the next walk on.
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _bump_generation(module: nn.Module, *_args) -> None:
    if module in _WATCHED:
        _STRUCTURE["generation"] += 1


def _watch_structure() -> None:
    if not _STRUCTURE["hooked"]:
        from torch.nn.modules import module as module_hooks

        module_hooks.register_module_module_registration_hook(_bump_generation)
        module_hooks.register_module_parameter_registration_hook(_bump_generation)
        _STRUCTURE["hooked"] = True


class _CheckpointedForward:
    """Stands in for ``module.forward`` (an instance attribute): checkpoints the original bound forward."""

    def __init__(
        self,
        module: nn.Module,
        forward: Callable,
        policy: str,
        preserve_rng_state: bool,
        park: bool = False,
        cuda_graphs: bool = False,
        index: int = 0,
    ) -> None:
        self.module_name = type(module).__name__
        self.is_training = lambda: module.training
        # The module is known here even when `forward` hides it (accelerate's functools.partial hooks).
        self.parameters, self.modules = module.parameters, module.modules
        self.forward = forward
        self.offload = {"auto": None, "offload": True, "recompute": False}[policy]
        self.checkpoint = True  # False: the layer runs as is and keeps its activations (a memory plan's choice)
        self.preserve_rng_state = preserve_rng_state
        self.park = park  # an offloaded layer's forward parks intermediates for its recompute (recompute_parking)
        self.graphs = LayerGraphs() if cuda_graphs else None  # forward and backward replayed (layer_graphs)
        # With graphs, parking goes through fixed slots (slot_parking); ``index``, the layer's place, picks its slot.
        self.parking = LayerParking(index)
        self._parameters_seen: tuple[int, list[nn.Parameter]] | None = None
        self._graph_seen: tuple[tuple[int, bool], tuple[list[nn.Module], dict] | None] | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The layer's parameters that require grad now. The walk over its modules (hundreds with peft's wrappers, a
        measurable share of a step's CPU time) is redone only after a module or parameter was registered inside it;
        requires_grad is read on every call, so freezing or unfreezing takes effect at once."""
        generation = _STRUCTURE["generation"]
        if self._parameters_seen is None or self._parameters_seen[0] != generation:
            _WATCHED.update(self.modules())
            self._parameters_seen = (generation, list(self.parameters()))
        return [p for p in self._parameters_seen[1] if p.requires_grad]

    def graph_plan(self) -> tuple[LayerGraphs, tuple, dict] | None:
        """(the layer's graphs, the state its graphs depend on, where its parameters are held), or None when the
        layer must run eagerly.

        A layer that draws random numbers (dropout while training) or has hooks on its submodules is never
        captured. The walk for that and for the LoRA modules is redone only after a registration inside the layer
        or a change of training mode; the adapters' switches (peft's disable_adapters, active adapters, merged,
        scaling) and the presence of global module hooks are read on every call. A hook added to a submodule of a
        layer already captured is not seen: switch ``cuda_graphs`` off and on to drop the captured graphs.
        """
        if self.graphs is None or global_hooks():
            return None
        seen = (_STRUCTURE["generation"], self.is_training())
        if self._graph_seen is None or self._graph_seen[0] != seen:
            _WATCHED.update(self.modules())
            owner = next(iter(self.modules()))
            eager = draws_random_numbers(owner) or has_inner_hooks(owner)
            self._graph_seen = (seen, None if eager else (lora_modules(owner), parameter_slots(owner)))
        if self._graph_seen[1] is None:
            return None
        modules, slots = self._graph_seen[1]
        return self.graphs, (seen, adapter_state(modules)), slots

    def set_mode(self, mode: str) -> None:
        """``"none"`` (keep activations), or checkpoint with ``"auto"``, ``"offload"`` or ``"recompute"``."""
        if mode not in (*POLICIES, "none"):
            raise ValueError(f"mode must be one of {(*POLICIES, 'none')}, got {mode!r}.")
        self.checkpoint = mode != "none"
        if self.checkpoint:
            self.offload = {"auto": None, "offload": True, "recompute": False}[mode]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden_states, args = args[0], args[1:]
        elif "hidden_states" in kwargs:
            hidden_states = kwargs.pop("hidden_states")
        else:
            raise TypeError(f"{self.module_name} was called without hidden_states (first positional argument).")
        if not torch.is_grad_enabled() or not self.checkpoint:
            return self.forward(hidden_states, *args, **kwargs)
        params = self.trainable_parameters()
        if isinstance(hidden_states, torch.Tensor) and (hidden_states.requires_grad or params):
            dropped = [k for k in _CACHE_KWARGS if kwargs.get(k) is not None and kwargs.get(k) is not False]
            if dropped:
                warnings.warn(
                    f"{self.module_name}: a KV cache cannot be written under checkpointing (the recompute would "
                    f"write it twice); setting {', '.join(dropped)} off for training.",
                    stacklevel=2,
                )
                kwargs.update({k: _CACHE_KWARGS[k] for k in dropped})
        return _checkpoint(
            self.forward,
            params,
            hidden_states,
            args,
            kwargs,
            self.offload,
            self.preserve_rng_state,
            whole_layer=True,
            park=self.park and self.graphs is None,
            graphs=self.graph_plan(),
            slot_parking=self.parking if self.park and self.graphs is not None else None,
        )


class OffloadedCheckpointingHandle:
    """Returned by :func:`apply_offloaded_checkpointing`; ``revert()`` puts every layer's forward back."""

    def __init__(self, entries: list[tuple[nn.Module, _CheckpointedForward, Any]]) -> None:
        self._entries = entries

    @property
    def layers(self) -> list[nn.Module]:
        return [module for module, _, _ in self._entries]

    @property
    def modes(self) -> list[str]:
        """Each layer's mode now: "none" (not checkpointed), "auto", "offload" or "recompute"."""
        names = {None: "auto", True: "offload", False: "recompute"}
        return [names[w.offload] if w.checkpoint else "none" for _, w, _ in self._entries]

    @property
    def park_intermediates(self) -> bool:
        """Whether offloaded layers park intermediates for their recompute (:func:`apply_offloaded_checkpointing`)."""
        return all(w.park for _, w, _ in self._entries)

    @park_intermediates.setter
    def park_intermediates(self, park: bool) -> None:
        for _, wrapper, _ in self._entries:
            wrapper.park = bool(park)

    @property
    def cuda_graphs(self) -> bool:
        """Whether checkpointed layers replay their forward and backward from CUDA graphs (see
        :func:`apply_offloaded_checkpointing`).

        Setting it (even to its current value) drops the graphs captured so far."""
        return all(w.graphs is not None for _, w, _ in self._entries)

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        for _, wrapper, _ in self._entries:
            wrapper.graphs = LayerGraphs() if on else None

    def set_modes(self, modes: list[str]) -> None:
        """Give each layer, in order, a mode: "none" keeps its activations (no recompute, fastest), "recompute"
        checkpoints it, "offload" also parks its input in pinned CPU memory, "auto" lets the input size decide."""
        if len(modes) != len(self._entries):
            raise ValueError(f"got {len(modes)} modes for {len(self._entries)} layers; give one mode per layer.")
        for (_, wrapper, _), mode in zip(self._entries, modes, strict=True):
            wrapper.set_mode(mode)

    def revert(self) -> None:
        for module, wrapper, previous in reversed(self._entries):
            wrapper.parking.release()
            if module.__dict__.get("forward") is not wrapper:
                raise RuntimeError(
                    f"{type(module).__name__}.forward was replaced after offloaded checkpointing was applied; "
                    "revert the later patch first (patches must be undone in reverse order)."
                )
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._entries = []

    def __enter__(self) -> OffloadedCheckpointingHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def apply_offloaded_checkpointing(
    model_layers: Iterable[nn.Module],
    policy: str = "auto",
    preserve_rng_state: bool = True,
    park_intermediates: bool = False,
    cuda_graphs: bool = False,
) -> OffloadedCheckpointingHandle:
    """Checkpoint every layer of ``model_layers`` (e.g. ``model.model.layers``), offloading inputs where it pays.

    Each layer's ``forward`` is replaced by an instance attribute that calls :func:`offloaded_checkpoint` on the
    original bound forward, so module hooks (PEFT, accelerate, FSDP) stay outside the checkpoint and run once. The
    layer's first positional argument (or ``hidden_states=``) is the offloaded input; it may return a tensor or a
    tuple. Under checkpointing a KV cache is switched off for the call (as transformers does), with a warning.

    Args:
        model_layers: decoder layers, in the order the model calls them.
        policy: "auto" (:func:`checkpoint_policy` per call, from the input's shape), "offload" or "recompute".
        preserve_rng_state: restore the RNG state for each recompute so that dropout masks match.
        park_intermediates: let a layer whose input is offloaded also park, in host memory, the intermediates its
            kernels offer for the recompute to take back instead of computing them again (the fused LoRA MLP's gate
            and up; :mod:`swiftune_kernels.recompute_parking`). Same gradients, less GPU work, ~7x the PCIe traffic
            and host memory of the offloaded inputs, and one layer's parked tensors more at the peak. Off by default:
            on H100 hosts it cut the GPU time of an 8B QLoRA step by ~16% but the step time by 0-8%, and some
            runs were slower (docs/BENCHMARKS.md). With ``cuda_graphs`` the layers park through fixed device slots
            instead (:mod:`swiftune_kernels.slot_parking`: the gate only, two slots of it on the device): on an
            H100, 8B QLoRA at batch 2 x 2048, 12.1-12.4k tokens/s against 11.4-11.6k with the graphs alone.
            Also settable later on the handle.
        cuda_graphs: on CUDA, capture each checkpointed layer's forward, and its recompute with backward, in CUDA
            graphs after two eager calls with the same input signature, and replay them from then on
            (:mod:`swiftune_kernels.layer_graphs`): the host issues one replay instead of the layer's hundreds of
            launches. Not for layers with dropout while training or hooks on their submodules. One layer's
            temporaries then live in a memory pool of their own (``layer_graphs.graph_pool_bytes()``). Off by
            default (docs/BENCHMARKS.md). Also settable later on the handle.

    Returns:
        A handle whose ``revert()`` restores every original forward.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")
    if isinstance(model_layers, nn.Module) and not isinstance(model_layers, (nn.ModuleList, nn.Sequential)):
        model_layers = [model_layers]
    layers = list(model_layers)
    for layer in layers:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"model_layers must hold nn.Module layers, got {type(layer).__name__}.")
        if isinstance(layer.__dict__.get("forward"), _CheckpointedForward):
            raise ValueError(f"{type(layer).__name__} already has offloaded checkpointing; revert its handle first.")
        if getattr(layer, "gradient_checkpointing", False) is True:
            raise ValueError(
                f"{type(layer).__name__} has transformers' gradient checkpointing on; call "
                "model.gradient_checkpointing_disable() first (offloaded checkpointing replaces it)."
            )
    _watch_structure()
    entries = []
    for index, layer in enumerate(layers):
        previous = layer.__dict__.get("forward")  # accelerate and others set an instance forward too
        wrapper = _CheckpointedForward(
            layer, layer.forward, policy, preserve_rng_state, park_intermediates, cuda_graphs, index
        )
        layer.forward = wrapper
        entries.append((layer, wrapper, previous))
    return OffloadedCheckpointingHandle(entries)
