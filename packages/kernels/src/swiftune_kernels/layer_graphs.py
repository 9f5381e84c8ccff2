"""CUDA graphs of a checkpointed decoder layer: its forward, and its recompute with backward, each one replay instead
of hundreds of launches issued from Python.

A checkpointed layer's forward runs without grad and hands back only its output, and its backward recomputes the
layer from the saved input and returns the gradients of the input and the adapters: both are pure functions of their
inputs and the weights, so each can be captured once and replayed. In a QLoRA step at batch 2 x 2048 (Llama-8B on
an H100) the host takes as long to issue a layer's launches as the GPU takes to run them, so the step waits on
Python; replayed, a layer costs the host a few copies and one launch each way, and the step becomes bound by the GPU.

How (:class:`LayerGraphs`, one per layer, kept by the checkpoint wrapper; the backward is captured only for a
layer whose forward was replayed, so the same rules hold for both):
- The first calls with a new input signature (shapes, dtypes, strides, the non-tensor arguments, autocast state and
  the layer's adapter state) run eagerly; the ``warmup``-th is captured on a side stream and replayed for its
  result, without an eager run beside it (that run's temporaries, from the allocator next to the pool's, were the
  step's highest point). Before a thread's first capture, two tiny matmuls on the capture stream make cuBLAS's
  workspaces there, which a capture would otherwise take from the pool.
- Every layer's graphs, forward and backward, share one memory pool and one set of input and output buffers per
  signature: replays run one after another on one stream, so one layer's temporaries (the larger of its forward's
  and its backward's) are all the pool holds, and the backward's temporaries no longer come from the allocator
  beside it. Inputs are copied into the shared buffers before a replay and the outputs are cloned out after it.
- A capture that fails (a host sync inside the layer, an op that cannot be captured) leaves that layer eager and
  stops all further captures in the process, with a warning. Layers whose modules draw random numbers (dropout with
  p > 0 while training), or whose submodules have forward hooks (a replay would skip them), are never captured;
  nor while global module hooks exist.

The pool is device memory that only these graphs use, beyond what the step allocates otherwise:
:func:`graph_pool_bytes` reports the part of it that ``torch.cuda.max_memory_allocated`` does not count, and a peak
measured that way must add it. No Triton kernel: this is capture and caching plumbing, proven on a GPU
(tests/test_layer_graphs.py); the signature and state logic is also proven on the CPU.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

# Eager runs of a signature before it is captured (the last one on the capture stream, which also warms up that
# stream's cuBLAS workspace); and the signatures a layer keeps graphs for (past it, new ones run eagerly).
WARMUP_CALLS = 2
MAX_GRAPHS_PER_LAYER = 4

_UNCAPTURABLE = object()
# Set by the first capture that fails: from then on no graph is captured in the process (graphs captured before keep
# replaying). After a failed capture PyTorch's capture state is not reliably whole again (on the H100, later
# captures of other layers failed or replayed wrong values in tests), so the layers stay eager instead.
_CAPTURE = {"failed": False}
# Per device: the memory pool and the capture stream every layer's graphs share; the shared input / output buffers.
_POOLS: dict[int, tuple] = {}
_STREAMS: dict[int, torch.cuda.Stream] = {}
_BUFFERS: dict[tuple, torch.Tensor] = {}
# (device, thread) pairs whose capture stream has run matmuls outside a capture: cuBLAS keeps a handle per thread and
# a workspace per handle and stream, and one made under capture would come from the graphs' pool and outlive the
# graphs there (the backward captures on autograd's device thread, the forward on the caller's).
_WARMED: set[tuple[int, int]] = set()


def _pool(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        _POOLS[index] = torch.cuda.graph_pool_handle()
    return _POOLS[index]


def _stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device)
    return _STREAMS[index]


def _warm_capture_stream(side: torch.cuda.Stream, device: torch.device) -> None:
    """Make sure this thread's cuBLAS handle has its workspace for ``side`` before anything is captured on it.

    PyTorch allocates a cuBLAS (and cuBLASLt) workspace per handle and stream at the first matmul there; made under
    capture it would come from the graphs' pool and stay there after the graphs are gone (the pool grows by it, and
    a later capture into that pool can fail). Handles are per thread: the backward captures on autograd's device
    thread, the forward on the caller's. Two tiny matmuls on the stream, a plain one and one with a bias (cuBLASLt's
    path), make both workspaces, without running a whole layer eagerly beside the pool.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    warmed = (index, threading.get_ident())
    if warmed not in _WARMED:
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.autocast(device_type="cuda", enabled=False):
            for dtype in (torch.bfloat16, torch.float32):
                a = torch.ones(16, 16, dtype=dtype, device=device)
                torch.addmm(a[0], a, a)
                torch.mm(a, a)
        torch.cuda.current_stream(device).wait_stream(side)
        _WARMED.add(warmed)


def graph_pool_bytes() -> int:
    """Device memory that the shared pools of the layer graphs hold apart (all devices) and that
    ``torch.cuda.memory_allocated`` does not count: the pools' free blocks, the graphs' temporaries between replays.

    The pools' blocks in use (what the graphs keep between replays) and the shared buffers are allocations like any
    other, already counted there; a peak from ``torch.cuda.max_memory_allocated`` plus this is what the step holds.
    """
    if not _POOLS:
        return 0
    pools = set(_POOLS.values())
    return sum(
        block["size"]
        for segment in torch.cuda.memory._snapshot()["segments"]
        if tuple(segment.get("segment_pool_id", ())) in pools
        for block in segment["blocks"]
        if not block["state"].startswith("active")
    )


def release_graphs_memory() -> None:
    """Forget the shared buffers (graphs that use them must be dropped first: :meth:`LayerGraphs.clear`)."""
    _BUFFERS.clear()


def _buffer(role: str, index: int, like: tuple[torch.Size, torch.dtype, torch.device]) -> torch.Tensor:
    """The shared buffer for argument or output ``index`` of this shape and dtype, allocated outside any pool."""
    key = (role, index, *like)
    buffer = _BUFFERS.get(key)
    if buffer is None:
        shape, dtype, device = like
        buffer = _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


def tensor_signature(tensors: list[torch.Tensor]) -> tuple:
    """Shapes, dtypes, strides and devices of ``tensors``: what a captured graph's kernels were specialized on."""
    return tuple((t.shape, t.dtype, t.stride(), t.device) for t in tensors)


def draws_random_numbers(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) applies dropout with p > 0 in its current training mode."""
    for sub in module.modules():
        if not sub.training:
            continue
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            return True
        rate = getattr(sub, "attention_dropout", 0.0)  # transformers' attention modules pass it to sdpa
        if isinstance(rate, (int, float)) and rate > 0:
            return True
    return False


def has_inner_hooks(module: nn.Module) -> bool:
    """Whether a submodule of ``module`` (not ``module`` itself, whose hooks run outside its checkpointed forward)
    has forward hooks: a replay would skip them, so such a layer runs eagerly."""
    return any(sub._forward_hooks or sub._forward_pre_hooks for sub in module.modules() if sub is not module)


def global_hooks() -> bool:
    """Whether forward hooks registered for every module (``nn.modules.module.register_module_forward_hook``) exist."""
    from torch.nn.modules import module as module_hooks

    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)


def lora_modules(module: nn.Module) -> list[nn.Module]:
    """The LoRA modules (peft's, ours) inside ``module``."""
    return [sub for sub in module.modules() if hasattr(sub, "lora_A")]


def adapter_state(modules: list[nn.Module]) -> tuple:
    """What peft lets a user switch on LoRA modules without registering anything (which the graphs would miss):
    adapters disabled, the active adapters, merged, and the scalings, for each of ``modules``."""
    state = []
    for sub in modules:
        scaling = getattr(sub, "scaling", {})
        state.append(
            (
                bool(getattr(sub, "disable_adapters", False)),
                tuple(getattr(sub, "active_adapters", ()) or ()),
                bool(getattr(sub, "merged", False)),
                tuple(scaling.items()) if isinstance(scaling, dict) else scaling,
            )
        )
    return tuple(state)


def parameter_slots(module: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Where each parameter of ``module`` is held: {id(parameter): [(owning submodule, attribute name), ...]}."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                slots.setdefault(id(param), []).append((sub, name))
    return slots


@contextlib.contextmanager
def standing_in(slots: dict, params: list[torch.Tensor], stand_ins: list[torch.Tensor]) -> Iterator[None]:
    """Let ``stand_ins`` take the place of ``params`` in their modules for a while.

    A backward captured in a CUDA graph differentiates with respect to stand-ins (detached aliases of the
    parameters, sharing their memory) made on the capture stream: the parameters' own gradient accumulators were
    made on the default stream, and the engine's wait on that stream cannot be captured.
    """
    swapped = []
    try:
        for param, stand_in in zip(params, stand_ins, strict=True):
            for module, name in slots[id(param)]:
                module._parameters[name] = stand_in  # a plain dict write: no registration hook, no new walk
                swapped.append((module, name, param))
        yield
    finally:
        for module, name, param in reversed(swapped):
            module._parameters[name] = param


@contextlib.contextmanager
def _without_autocast_cache() -> Iterator[None]:
    """Autocast as it is, with its cache of weight casts off: a cast served from that cache would not be captured
    (the replays would read memory the cache gave back at the end of its step), so each graph casts for itself."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device_type):
                dtype = torch.get_autocast_dtype(device_type)
                stack.enter_context(torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=False))
        yield


class _Graph:
    __slots__ = ("graph", "inputs", "outputs", "output_spec")

    def __init__(self, graph, inputs, outputs, output_spec) -> None:
        self.graph, self.inputs, self.outputs, self.output_spec = graph, inputs, outputs, output_spec


class LayerGraphs:
    """The captured forwards and backwards of one layer, by signature (see the module docstring)."""

    def __init__(self, warmup: int = WARMUP_CALLS, max_graphs: int = MAX_GRAPHS_PER_LAYER) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 eager call before capture, got {warmup}.")
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, Any] = {}  # signature -> _Graph, or _UNCAPTURABLE
        self._eager_calls: dict[tuple, int] = {}
        self._output_like: dict[tuple, list] = {}  # (shape, dtype, device) of the outputs of the last eager call
        self.captures = 0  # graphs captured, and replays run (for tests and benchmarks)
        self.replays = 0
        self.last_error: str | None = None  # why the last failed capture failed
        self._warned = False

    def clear(self) -> None:
        """Drop every graph (their pool memory returns when no layer holds a graph of it)."""
        self._graphs.clear()
        self._eager_calls.clear()
        self._output_like.clear()

    def run(
        self,
        run: Callable[[torch.Tensor, list[torch.Tensor]], tuple[Any, list[torch.Tensor]]],
        hidden_states: torch.Tensor,
        arg_tensors: list[torch.Tensor],
        state: tuple,
    ) -> tuple[Any, list[torch.Tensor]]:
        """``run(hidden_states, arg_tensors)`` -> (output spec, output tensors): replayed from a graph when one was
        captured for this signature, else eagerly (capturing it at the ``warmup``-th eager call)."""
        tensors = [hidden_states, *arg_tensors]
        key = (tensor_signature(tensors), state)
        entry = self._graphs.get(key)
        if isinstance(entry, _Graph):
            return self._replay(entry, tensors)
        calls = self._eager_calls.get(key, 0) + 1
        full = len(self._graphs) >= self.max_graphs
        if entry is _UNCAPTURABLE or full or _CAPTURE["failed"]:
            self._eager_calls[key] = calls
            return run(hidden_states, arg_tensors)
        if calls < self.warmup:  # a warm-up call: its outputs' shapes are what the capture's buffers take
            self._eager_calls[key] = calls
            spec, outputs = run(hidden_states, arg_tensors)
            self._output_like[key] = [(o.shape, o.dtype, o.device) for o in outputs]
            return spec, outputs
        return self._capture(run, key, tensors)

    def _replay(self, entry: _Graph, tensors: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
        for buffer, tensor in zip(entry.inputs, tensors, strict=True):
            buffer.copy_(tensor)
        entry.graph.replay()
        self.replays += 1
        # cloned: the next layer's replay writes the same output buffers while this output is still in use
        return entry.output_spec, [buffer.clone() for buffer in entry.outputs]

    def _capture(self, run, key: tuple, tensors: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
        device = tensors[0].device
        index = device.index if device.index is not None else torch.cuda.current_device()
        main, side = torch.cuda.current_stream(device), _stream(device)
        inputs = [_buffer("in", i, (t.shape, t.dtype, t.device)) for i, t in enumerate(tensors)]
        like = self._output_like.get(key)
        if like is not None:
            _warm_capture_stream(side, device)
            # Capture at once and replay for this call's result. An eager run here would hold its temporaries from
            # the allocator beside the pool's (a layer's backward working set twice, ~0.9 GiB at Llama-8B, batch
            # 2 x 2048), the step's highest point.
            spec = outputs = None
            side.wait_stream(main)
        else:
            # No warm-up call told the outputs' shapes (warmup=1): this call's result is computed eagerly on the
            # capture stream, which also warms that stream up, and is what this call returns.
            side.wait_stream(main)
            with torch.cuda.stream(side):
                spec, outputs = run(tensors[0], tensors[1:])
            main.wait_stream(side)
            for tensor in tensors:  # read on the side stream: not reused before that work is done
                tensor.record_stream(side)
            for tensor in outputs:  # made on the side stream, used on the main one from now on
                tensor.record_stream(main)
            _WARMED.add((index, threading.get_ident()))
            like = [(o.shape, o.dtype, o.device) for o in outputs]
        # allocated here, outside the graphs' pool (an allocation under capture would come from it)
        shared_outputs = [_buffer("out", i, o) for i, o in enumerate(like)]
        graph = torch.cuda.CUDAGraph()
        generator = torch.cuda.default_generators[device.index if device.index is not None else main.device.index]
        fresh_rng = generator.clone_state()
        try:
            # thread_local: a backward captures on autograd's device thread; other threads' calls are not its own
            with (
                torch.cuda.graph(graph, pool=_pool(device), stream=side, capture_error_mode="thread_local"),
                _without_autocast_cache(),
            ):
                captured_spec, captured = run(inputs[0], inputs[1:])
                if len(captured) != len(shared_outputs) or any(
                    c.shape != o.shape or c.dtype != o.dtype for c, o in zip(captured, shared_outputs, strict=False)
                ):
                    raise RuntimeError("the captured forward returned other outputs than its eager run")
                for buffer, value in zip(shared_outputs, captured, strict=True):
                    buffer.copy_(value)
                del captured  # back to the pool: the next layer's capture reuses it
        except Exception as error:  # an op that cannot be captured (a host sync, a data-dependent shape): eager
            self._graphs[key] = _UNCAPTURABLE
            _CAPTURE["failed"] = True
            with contextlib.suppress(Exception):  # a capture cut short may leave the pool recording it
                torch._C._cuda_endAllocateToPool(device.index if device.index is not None else 0, _pool(device))
            self.last_error = f"{type(error).__name__}: {error}"
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"a CUDA graph of a checkpointed layer could not be captured ({self.last_error[:300]}); no "
                    "further layer graphs are captured in this process (those captured before keep replaying).",
                    stacklevel=2,
                )
            torch.cuda.synchronize(device)
            # A capture that fails leaves the CUDA generator's state marked as capturing (PyTorch ends that mark
            # only after a successful capture), and every later random op in the process would then raise: the
            # generator gets an unmarked copy of its state back.
            generator.graphsafe_set_state(fresh_rng)
            if outputs is None:  # nothing ran for this call yet: it runs eagerly
                return run(tensors[0], tensors[1:])
            return spec, outputs
        main.wait_stream(side)
        entry = self._graphs[key] = _Graph(graph, inputs, shared_outputs, captured_spec)
        self._eager_calls.pop(key, None)
        self.captures += 1
        if outputs is None:
            return self._replay(entry, tensors)
        return spec, outputs
