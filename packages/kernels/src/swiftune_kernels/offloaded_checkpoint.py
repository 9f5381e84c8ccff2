"""Gradient checkpointing whose saved layer inputs wait in pinned CPU memory until backward needs them.

Plain checkpointing keeps one tensor per decoder layer on the GPU (the layer's input, ``batch x seq x hidden``)
and recomputes the layer in backward. At long sequences these inputs add up (32 layers x 128k tokens x 4096 x
bf16 = 32 GiB), so here each input is copied to pinned CPU memory on a side stream during forward, the GPU copy
is released, and in backward the copy for layer ``i - 1`` starts when the backward of layer ``i`` starts, so it
overlaps that layer's recompute. At short sequences the copies buy little memory, and :func:`checkpoint_policy`
picks plain recomputation instead.

Whole decoder layers are wrapped by :func:`swiftune_kernels.layer_checkpointing.apply_offloaded_checkpointing`.
No Triton kernel: this is stream and autograd plumbing. On the CPU the "offload" is a plain copy (same ownership
semantics, so the tests prove the logic there); the CUDA copies are proven by the tests when they run on a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from swiftune_kernels.layer_graphs import standing_in
from swiftune_kernels.offload_host_copy import HostCopy
from swiftune_kernels.recompute_parking import ParkingLot, parked_for_recompute, parking_for_forward

# Offload a layer input when it holds at least this many elements (batch x seq x hidden). Measured on an H100
# (2026-11-23, docs/BENCHMARKS.md, 8B-shaped layers): from 512 tokens at hidden 4096 on, offloaded checkpointing
# ran within 3% of plain recomputation (the copies hide behind the layer's compute), so shorter inputs, where the
# per-layer copy and events are not hidden, keep plain recomputation.
OFFLOAD_MIN_ELEMENTS = 512 * 4096
POLICIES = ("auto", "offload", "recompute")


def checkpoint_policy(
    seq_len: int,
    hidden_size: int,
    batch_size: int = 1,
    device: torch.device | str = "cuda",
    min_elements: int | None = None,
) -> Literal["offload", "recompute"]:
    """Choose between offloaded and plain checkpointing for one layer input.

    By estimate each copy (8 KiB per token at hidden 4096, ~25-50 GB/s) is ~4-10x cheaper than the compute it
    overlaps (a layer's forward, or its recompute plus backward: ~0.9 and ~1.3-1.8 GFLOP per token at Llama-8B
    shapes, ~500 TFLOP/s on an H100), so it hides behind compute at any length; what decides is whether the freed
    memory is worth the fixed cost per layer (pinned buffer, two events, two stream waits). That is a size
    threshold, measured on the GPU.

    Args:
        seq_len: tokens per sequence.
        hidden_size: size of the hidden dimension.
        batch_size: sequences per batch.
        device: where the layer runs; only CUDA offloads (on the CPU there is nothing to free).
        min_elements: threshold in elements, default :data:`OFFLOAD_MIN_ELEMENTS`.

    Returns:
        "offload" when ``batch_size * seq_len * hidden_size >= min_elements`` on CUDA, else "recompute".
    """
    for name, value in (("seq_len", seq_len), ("hidden_size", hidden_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    threshold = OFFLOAD_MIN_ELEMENTS if min_elements is None else min_elements
    if torch.device(device).type != "cuda":
        return "recompute"
    return "offload" if batch_size * seq_len * hidden_size >= threshold else "recompute"


# True while a decoder layer wrapped by apply_offloaded_checkpointing is recomputed for its backward; and while such
# a layer runs its checkpointed forward (the one that will be recomputed).
_RECOMPUTING_LAYER: contextvars.ContextVar[bool] = contextvars.ContextVar("swiftune_recomputing_layer", default=False)
_CHECKPOINTED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("swiftune_checkpointed", default=False)


def recomputing_for_backward() -> bool:
    """Whether the code running now is the recompute of a whole decoder layer wrapped by
    :func:`apply_offloaded_checkpointing`, run only to rebuild the graph for the layer's backward.

    The values of that recompute's layer output are never read (the gradient flowing in was computed from the
    forward's output), so a last operation whose result only reaches the output through the residual sum, e.g.
    the MLP's down projection in a Llama layer, need not be computed (``lora_mlp(..., output_needed=False)``).
    Which operations qualify depends on the architecture, so the caller decides; this only says when.
    """
    return _RECOMPUTING_LAYER.get()


def in_checkpointed_forward() -> bool:
    """Whether the code running now is the forward of a whole decoder layer wrapped by
    :func:`apply_offloaded_checkpointing` that will be recomputed for its backward (what it computes once, the
    recompute may take back instead of computing it again)."""
    return _CHECKPOINTED_FORWARD.get()


# --- nested arguments and outputs: tensors out, a spec with numbered slots left behind --------------------------


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _flatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """Append the tensors inside tuples, lists and dicts of ``obj`` to ``tensors``; return ``obj`` with slots."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, (tuple, list)):
        return _rebuild(obj, [_flatten(item, tensors) for item in obj])
    if type(obj) is dict:
        return {key: _flatten(value, tensors) for key, value in obj.items()}
    return obj


def _fill(spec: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(spec, _Slot):
        return tensors[spec.index]
    if isinstance(spec, (tuple, list)):
        return _rebuild(spec, [_fill(item, tensors) for item in spec])
    if type(spec) is dict:
        return {key: _fill(value, tensors) for key, value in spec.items()}
    return spec


def spec_key(spec: Any) -> Any:
    """A hashable stand-in for a spec of :func:`_flatten` (the layer graphs' signature of the non-tensor arguments).

    Plain values count by value, slots by index; any other object by identity, so that an object made anew on every
    call (whose meaning a graph cannot know) never reaches a capture.
    """
    if spec is None or isinstance(spec, (bool, int, float, str, torch.dtype, torch.device)):
        return spec
    if isinstance(spec, _Slot):
        return ("slot", spec.index)
    if isinstance(spec, (tuple, list)):
        return (type(spec).__name__, *(spec_key(item) for item in spec))
    if type(spec) is dict:
        return ("dict", *((key, spec_key(value)) for key, value in spec.items()))
    return ("object", id(spec))


def _rebuild(like: tuple | list, items: list) -> tuple | list:
    if isinstance(like, tuple) and hasattr(like, "_fields"):  # namedtuple
        return type(like)(*items)
    return type(like)(items)


# --- autograd -------------------------------------------------------------------------------------------------


class _Plan:
    """What forward and backward share that is not a tensor: the function, argument structure, options."""

    def __init__(
        self,
        run_function,
        spec,
        num_arg_tensors,
        params,
        offload,
        preserve_rng_state,
        whole_layer=False,
        park=False,
        graphs=None,
        slot_parking=None,
    ) -> None:
        self.run_function = run_function
        # The layer's LayerParking when its forward parks through fixed slots (slot_parking; with the layer graphs)
        self.slot_parking = slot_parking
        # (LayerGraphs, the layer's state its graphs depend on, where its parameters are held) when the layer may
        # be replayed from graphs (layer_graphs)
        self.graphs = graphs
        self.whole_layer = whole_layer  # a decoder layer wrapped per layer: recomputing_for_backward() holds
        self.park = park  # its forward may park intermediates for its recompute (recompute_parking)
        self.spec = spec  # (args, kwargs) with _Slot in place of tensors
        self.num_arg_tensors = num_arg_tensors
        self.params = params  # the layer's trainable parameters, or None when layer_fn is not a module's
        self.offload = offload
        self.preserve_rng_state = preserve_rng_state
        self.output_spec = None

    def run(self, hidden_states: torch.Tensor, arg_tensors) -> tuple[Any, list[torch.Tensor]]:
        args, kwargs = _fill(self.spec, list(arg_tensors))
        outputs = self.run_function(hidden_states, *args, **kwargs)
        out_tensors: list[torch.Tensor] = []
        return _flatten(outputs, out_tensors), out_tensors


def _autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype, bool]]:
    cache = torch.is_autocast_cache_enabled()
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t), cache) for t in sorted({"cpu", device_type})]


class OffloadedCheckpointFunction(torch.autograd.Function):
    """Run a layer without saving its activations; keep its input on the host; recompute it in backward.

    Inputs: the :class:`_Plan`, the hidden states, the tensors found in the other arguments, then the layer's
    trainable parameters (as inputs so that the output requires grad even when no input does, e.g. LoRA over
    frozen embeddings, and so that their gradients come back through the ordinary engine).
    """

    @staticmethod
    def forward(ctx, plan: _Plan, hidden_states: torch.Tensor, *tensors: torch.Tensor):
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        device = hidden_states.device
        if plan.preserve_rng_state:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        ctx.autocast = _autocast_state(device.type)
        arg_tensors = tensors[: plan.num_arg_tensors]
        # Past the bound on host memory (offload_host_copy), the input stays on its device like a recomputed one's.
        ctx.host_copy = HostCopy.park(hidden_states) if plan.offload else None
        ctx.offloaded = ctx.host_copy is not None
        if ctx.offloaded:
            ctx.save_for_backward(*arg_tensors)
        else:
            ctx.save_for_backward(hidden_states, *arg_tensors)
        # A whole layer with its input parked may park intermediates too (recompute_parking); they go back with it.
        ctx.lot = ParkingLot() if ctx.offloaded and plan.whole_layer and plan.park else None
        if ctx.lot is not None:
            ctx.host_copy.followers.append(ctx.lot)
        # Slot parking (slot_parking) for a whole layer with its input parked; it replaces the lot above.
        parking = plan.slot_parking if ctx.offloaded and plan.whole_layer and ctx.lot is None else None
        ctx.parking, ctx.park_generation = parking, None
        graphed = plan.graphs is not None and ctx.lot is None and not torch.cuda.is_current_stream_capturing()
        # Through the layer graphs the forward keeps nothing for its recompute (adapter casts, lora_linear): the
        # recompute differentiates with respect to stand-ins of the parameters and would never take it.
        token = _CHECKPOINTED_FORWARD.set(plan.whole_layer and not graphed)
        try:
            ctx.graph_state = None
            run = plan.run
            if parking is not None:  # its spec also says which slots it filled
                parking.before_forward(device)
                run = parking.wrap_forward(plan.run)
            if graphed:
                graphs, state, _ = plan.graphs
                signature = None if parking is None else parking.signature()
                ctx.graph_state = state = (spec_key(plan.spec), tuple(ctx.autocast), state, signature)
                spec, out_tensors = graphs.run(run, hidden_states, list(arg_tensors), state)
            else:
                with parking_for_forward(ctx.lot):
                    spec, out_tensors = run(hidden_states, arg_tensors)
            if parking is not None:
                spec, parked = spec
                ctx.park_generation = parking.after_forward(parked)
                if ctx.park_generation is not None:
                    ctx.host_copy.followers.append(parking)  # its upload starts with the input's
            plan.output_spec = spec
        finally:
            _CHECKPOINTED_FORWARD.reset(token)
        if not out_tensors:
            raise TypeError("layer_fn returned no tensor; offloaded_checkpoint needs a tensor output to backprop.")
        return tuple(out_tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        plan = ctx.plan
        saved = list(ctx.saved_tensors)
        if ctx.offloaded:
            if ctx.host_copy is None:
                raise RuntimeError(
                    "backward ran twice through an offloaded checkpoint (retain_graph=True); its host copy is freed "
                    "after the first backward. Use offload=False (policy='recompute') for repeated backward passes."
                )
            # Freed here, not with the graph: the caller's `loss` keeps the graph alive into the next step.
            hidden_states, ctx.host_copy = ctx.host_copy.fetch(), None
        else:
            hidden_states = saved.pop(0)
            if plan.whole_layer:
                HostCopy.prefetch_newest(hidden_states.device)
        lot, ctx.lot = ctx.lot, None  # what the forward parked for this recompute (recompute_parking)
        parking, ctx.parking = ctx.parking, None
        if parking is not None:  # what it parked through slots (slot_parking), when its host buffers still hold it
            lot = parking.recompute_lot(ctx.park_generation)
        needs = ctx.needs_input_grad[1:]  # hidden_states, argument tensors, then parameters
        if ctx.graph_state is not None and plan.params is not None and not torch.cuda.is_current_stream_capturing():
            # The forward went through the layer graphs (so nothing in the layer draws random numbers): the
            # recompute and backward do too, captured after the same warm-up, in the same pool (layer_graphs).
            present = tuple(g is not None for g in grad_outputs)
            state = ("backward", ctx.graph_state, needs, present, lot is not None)
            given = [g for g in grad_outputs if g is not None]

            graphs, _, slots = plan.graphs

            def recompute_and_grad(h, rest):
                given_grads = iter(rest[len(saved) :])
                grads = [next(given_grads) if p else None for p in present]
                stand_ins = [p.detach().requires_grad_(p.requires_grad) for p in plan.params]
                with standing_in(slots, plan.params, stand_ins):
                    result = _recompute_and_grad(ctx, lot, needs, h, rest[: len(saved)], grads, stand_ins)
                found: list[torch.Tensor] = []
                return [None if r is None else _flatten(r, found) for r in result], found

            spec, found = graphs.run(recompute_and_grad, hidden_states, [*saved, *given], state)
            if parking is not None and lot is not None:
                parking.after_backward(lot)
            return (None, *(None if r is None else _fill(r, found) for r in spec))
        device = hidden_states.device
        cuda_devices = [device] if plan.preserve_rng_state and device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices, enabled=plan.preserve_rng_state):
            if plan.preserve_rng_state:
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, device)
            result = _recompute_and_grad(ctx, lot, needs, hidden_states, saved, grad_outputs)
        if parking is not None and lot is not None:
            parking.after_backward(lot)
        return (None, *result)


def _recompute_and_grad(ctx, lot, needs, hidden_states, saved, grad_outputs, params=None) -> list:
    """The gradients of a checkpointed layer's inputs (those in ``needs``, else None), from its recompute; with
    respect to ``params`` in place of the plan's parameters when given (stand-ins, layer_graphs)."""
    plan = ctx.plan
    params = plan.params if params is None else params
    num_inputs = 1 + len(saved)
    inputs = [
        t.detach().requires_grad_(need) for t, need in zip([hidden_states, *saved], needs[:num_inputs], strict=True)
    ]
    # Autocast's cache of weight casts is off under CUDA graph capture: a cast served from it is not captured, and
    # the replays would read memory that the cache has long given back.
    capturing = hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()
    with torch.enable_grad():
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype, cache in ctx.autocast:
                stack.enter_context(
                    torch.autocast(
                        device_type=device_type, enabled=enabled, dtype=dtype, cache_enabled=cache and not capturing
                    )
                )
            token = _RECOMPUTING_LAYER.set(plan.whole_layer)
            try:
                with parked_for_recompute(lot):
                    _, out_tensors = plan.run(inputs[0], inputs[1:])
            finally:
                _RECOMPUTING_LAYER.reset(token)
        if len(out_tensors) != len(grad_outputs):
            raise RuntimeError(
                f"layer_fn returned {len(out_tensors)} tensors when recomputed but {len(grad_outputs)} in forward; "
                "a checkpointed layer must return the same structure every time."
            )
        pairs = [(o, g) for o, g in zip(out_tensors, grad_outputs, strict=True) if g is not None and o.requires_grad]
        outputs, grads = [o for o, _ in pairs], [g for _, g in pairs]
        if params is not None:
            wrt = [t for t, need in zip([*inputs, *params], needs, strict=True) if need]
            found = iter(torch.autograd.grad(outputs, wrt, grads, allow_unused=True) if outputs else [None] * len(wrt))
            return [next(found) if need else None for need in needs]
        # layer_fn may close over parameters we cannot see: accumulate into every leaf, as reentrant
        # torch.utils.checkpoint does, and read the inputs' gradients off their detached copies.
        if outputs:
            torch.autograd.backward(outputs, grads)
        result = [t.grad if need else None for t, need in zip(inputs, needs[:num_inputs], strict=True)]
        return result + [None] * (len(needs) - num_inputs)


def _layer_parameters(layer_fn: Callable) -> list[nn.Parameter] | None:
    """The trainable parameters of the module behind ``layer_fn``, or None when no module can be seen."""
    owner = layer_fn
    while isinstance(owner, functools.partial):
        owner = owner.args[0] if owner.args and isinstance(owner.args[0], nn.Module) else owner.func
    owner = owner if isinstance(owner, nn.Module) else getattr(owner, "__self__", None)
    if not isinstance(owner, nn.Module):
        return None
    return [p for p in owner.parameters() if p.requires_grad]


def offloaded_checkpoint(
    layer_fn: Callable,
    hidden_states: torch.Tensor,
    *args: Any,
    offload: bool | None = None,
    preserve_rng_state: bool = True,
    **kwargs: Any,
) -> Any:
    """Run ``layer_fn(hidden_states, *args, **kwargs)`` with gradient checkpointing, its input parked on the host.

    Forward runs the layer without keeping activations and, when offloading, copies ``hidden_states`` to pinned
    CPU memory on a side stream and keeps no reference to the GPU tensor (drop yours, as a decoder loop does).
    Backward brings it back (the previous layer's copy is started at the same time), recomputes the layer with
    the forward's RNG and autocast state, and returns gradients for ``hidden_states``, for every tensor in
    ``args``/``kwargs`` (inside tuples, lists and dicts too) that requires grad, and for the layer's parameters.

    Parameters are known when ``layer_fn`` is an ``nn.Module``, its bound method, or a ``functools.partial`` of
    one; their gradients flow even when no input requires grad (LoRA on frozen embeddings). Any other callable
    gets its closed-over parameters' gradients accumulated into ``.grad`` during backward, as reentrant
    ``torch.utils.checkpoint`` does, provided some input requires grad (else it runs unchanged, without
    checkpointing). Without grad mode, or with nothing to differentiate, the layer just runs.
    Do not modify ``hidden_states`` in place after the call: the copy to the host may still be reading it.
    ``offload`` and ``preserve_rng_state`` are taken here and not passed on to ``layer_fn``. Offloaded inputs live
    in pinned host memory, which PyTorch's host allocator caches for reuse by the next step.

    Args:
        layer_fn: the layer; called twice (forward, recompute), so it must not have side effects such as
            writing a KV cache.
        hidden_states: (..., hidden) floating tensor, the input that is offloaded.
        *args: further arguments for ``layer_fn``; tensors among them stay where they are (masks, RoPE tables
            are shared by all layers).
        offload: True to offload, False for plain checkpointing, None to ask :func:`checkpoint_policy`.
        preserve_rng_state: restore the RNG state for the recompute so that dropout masks match.
        **kwargs: keyword arguments for ``layer_fn``.

    Returns:
        What ``layer_fn`` returns (a tensor, or tuples/lists/dicts holding tensors and other values).
    """
    if not callable(layer_fn):
        raise TypeError(f"layer_fn must be callable (a module or function), got {type(layer_fn).__name__}.")
    return _checkpoint(layer_fn, _layer_parameters(layer_fn), hidden_states, args, kwargs, offload, preserve_rng_state)


def _checkpoint(
    layer_fn,
    params,
    hidden_states,
    args,
    kwargs,
    offload,
    preserve_rng_state,
    whole_layer=False,
    park=False,
    graphs=None,
    slot_parking=None,
):
    if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
        got = hidden_states.dtype if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise TypeError(f"hidden_states must be a floating-point tensor, got {got}.")
    arg_tensors: list[torch.Tensor] = []
    spec = _flatten((args, kwargs), arg_tensors)
    wants_grad = hidden_states.requires_grad or any(t.requires_grad for t in arg_tensors) or bool(params)
    if not torch.is_grad_enabled() or not wants_grad:
        return layer_fn(hidden_states, *args, **kwargs)
    if offload is None:
        shape = hidden_states.shape
        seq_len = shape[-2] if hidden_states.dim() >= 2 else 1
        batch = max(1, hidden_states.numel() // max(1, seq_len * shape[-1]))
        offload = checkpoint_policy(max(1, seq_len), max(1, shape[-1]), batch, hidden_states.device) == "offload"
    if graphs is not None and hidden_states.device.type != "cuda":
        graphs = None
    plan = _Plan(
        layer_fn, spec, len(arg_tensors), params, bool(offload), preserve_rng_state, whole_layer, park, graphs,
        slot_parking,
    )  # fmt: skip
    out_tensors = OffloadedCheckpointFunction.apply(plan, hidden_states, *arg_tensors, *(params or []))
    return _fill(plan.output_spec, list(out_tensors))
