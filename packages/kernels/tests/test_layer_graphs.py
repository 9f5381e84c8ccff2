"""Checkpointed layers replayed from CUDA graphs (layer_graphs), forward and backward: the same outputs and gradients
as eager, a capture per input signature after the warm-up calls, eager runs where a graph would be wrong or cannot be
captured. The tests of a failed capture come last in this file: the first failure switches captures off for the
rest of the process.

The capture itself needs CUDA; the signature, state and dispatch logic is proven on the CPU too."""

import importlib

import pytest
import torch
from torch import nn

from swiftune_kernels import apply_offloaded_checkpointing, rms_norm

graphs_module = importlib.import_module("swiftune_kernels.layer_graphs")
checkpoint_module = importlib.import_module("swiftune_kernels.offloaded_checkpoint")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

HIDDEN, INTER, RANK = 64, 160, 8


class TinyLoRALayer(nn.Module):
    """A pre-norm residual block with a frozen base, LoRA adapters and a table passed in as a keyword argument (as
    decoder layers take position embeddings)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(HIDDEN), requires_grad=False)
        self.up = nn.Linear(HIDDEN, INTER, bias=False).requires_grad_(False)
        self.down = nn.Linear(INTER, HIDDEN, bias=False).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(RANK, HIDDEN) / 8)
        self.lora_B = nn.Parameter(torch.randn(INTER, RANK) / 8)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, table=None):
        h = rms_norm(x, self.norm)
        if table is not None:
            h = h * table
        up = self.up(h) + self.dropout(h) @ self.lora_A.t() @ self.lora_B.t()
        return x + self.down(torch.nn.functional.silu(up))


def _stack(n, device, layer=None, **layer_options):
    torch.manual_seed(0)
    return nn.ModuleList((layer or TinyLoRALayer)(**layer_options) for _ in range(n)).to(device)


def _step(layers, x, table, dy):
    for p in layers.parameters():
        p.grad = None
    h = x.clone().requires_grad_()
    y = h
    for layer in layers:
        y = layer(y, table=table)
    y.backward(dy)
    return [y.detach(), h.grad, *(p.grad for p in layers.parameters() if p.requires_grad)]


def _wrappers(layers):
    return [layer.__dict__["forward"] for layer in layers]


def _pair(device, policy="recompute", n=1, layer=None, **layer_options):
    """Two identical stacks of ``n`` layers, checkpointed with ``policy``: eagerly, and replayed from graphs."""
    eager, graphed = (_stack(n, device, layer, **layer_options) for _ in "eg")
    apply_offloaded_checkpointing(eager, policy=policy)
    apply_offloaded_checkpointing(graphed, policy=policy, cuda_graphs=True)
    return eager, graphed


def _steps(layers, steps, tokens=8):
    """``steps`` training steps of ``layers`` on one random batch of ``tokens`` tokens."""
    device = next(layers.parameters()).device
    x, dy = torch.randn(1, tokens, HIDDEN, device=device), torch.randn(1, tokens, HIDDEN, device=device)
    for _ in range(steps):
        _step(layers, x, None, dy)


# --- CPU: signature, state and dispatch -------------------------------------------------------------------------


def test_spec_key_counts_plain_values_by_value_and_objects_by_identity():
    slot = checkpoint_module._Slot
    key = checkpoint_module.spec_key
    assert key(((slot(0),), {"use_cache": False, "n": 3})) == key(((slot(0),), {"use_cache": False, "n": 3}))
    assert key(((slot(0),), {"n": 3})) != key(((slot(1),), {"n": 3}))
    assert key({"n": 3}) != key({"n": 4})
    first, second = object(), object()
    assert key({"cache": first}) == key({"cache": first})
    assert key({"cache": first}) != key({"cache": second})


def test_dropout_while_training_is_seen_as_drawing_random_numbers():
    layer = TinyLoRALayer(dropout=0.1)
    assert graphs_module.draws_random_numbers(layer.train())
    assert not graphs_module.draws_random_numbers(layer.eval())
    assert not graphs_module.draws_random_numbers(TinyLoRALayer(dropout=0.0).train())
    attention = nn.Module()
    attention.attention_dropout = 0.1
    assert graphs_module.draws_random_numbers(attention.train())


def test_adapter_state_changes_with_peft_switches():
    layer = TinyLoRALayer()
    layer.disable_adapters, layer.active_adapters, layer.merged, layer.scaling = False, ["default"], False, {}
    modules = graphs_module.lora_modules(layer)
    assert modules == [layer]
    before = graphs_module.adapter_state(modules)
    layer.disable_adapters = True
    assert graphs_module.adapter_state(modules) != before
    layer.disable_adapters = False
    layer.scaling = {"default": 2.0}
    assert graphs_module.adapter_state(modules) != before


def test_graph_plan_is_none_with_dropout_and_follows_training_mode():
    layers = _stack(1, "cpu", dropout=0.1)
    handle = apply_offloaded_checkpointing(layers, policy="recompute", cuda_graphs=True)
    (wrapper,) = _wrappers(layers)
    assert handle.cuda_graphs
    assert wrapper.graph_plan() is None  # training with dropout
    layers.eval()
    assert wrapper.graph_plan() is not None
    layers.train()
    assert wrapper.graph_plan() is None
    handle.cuda_graphs = False
    assert wrapper.graph_plan() is None and not handle.cuda_graphs
    handle.revert()


def test_graph_plan_changes_after_a_parameter_is_replaced():
    layers = _stack(1, "cpu")
    handle = apply_offloaded_checkpointing(layers, policy="recompute", cuda_graphs=True)
    (wrapper,) = _wrappers(layers)
    _, before, _ = wrapper.graph_plan()
    layers[0].lora_A = nn.Parameter(torch.zeros(RANK, HIDDEN))
    _, after, _ = wrapper.graph_plan()
    assert before != after
    handle.revert()


def test_stand_ins_take_the_parameters_place_and_give_it_back():
    layer = TinyLoRALayer()
    slots = graphs_module.parameter_slots(layer)
    params = [p for p in layer.parameters() if p.requires_grad]
    stand_ins = [p.detach().requires_grad_() for p in params]
    x = torch.randn(3, HIDDEN)
    with graphs_module.standing_in(slots, params, stand_ins):
        assert layer.lora_A is stand_ins[0] and layer.lora_B is stand_ins[1]
        grads = torch.autograd.grad(layer(x).sum(), stand_ins)
    assert layer.lora_A is params[0] and layer.lora_B is params[1]
    assert params[0].grad is None  # the gradients went to the stand-ins only
    want = torch.autograd.grad(layer(x).sum(), params)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w)


def test_run_captures_at_the_warmup_call_then_replays(monkeypatch):
    graphs = graphs_module.LayerGraphs(warmup=2, max_graphs=2)
    events = []

    def capture(run, key, tensors):
        events.append("capture")
        graphs._graphs[key] = graphs_module._Graph(None, [], [], "spec")
        return run(tensors[0], tensors[1:])

    monkeypatch.setattr(graphs, "_capture", capture)
    monkeypatch.setattr(graphs, "_replay", lambda entry, tensors: (events.append("replay"), ("spec", []))[1])

    def run(hidden, args):
        events.append("eager")
        return "spec", [hidden]

    x, table = torch.zeros(2, 3), torch.zeros(3)
    for _ in range(4):
        graphs.run(run, x, [table], state=("s",))
    assert events == ["eager", "capture", "eager", "replay", "replay"]
    events.clear()
    graphs.run(run, torch.zeros(4, 3), [table], state=("s",))  # new shape: its own warm-up
    graphs.run(run, x, [table], state=("other",))  # new state: its own warm-up
    assert events == ["eager", "eager"]
    graphs.run(run, torch.zeros(4, 3), [table], state=("s",))  # second signature captured: max_graphs reached
    events.clear()
    graphs.run(run, x, [table], state=("other",))  # a third would be captured here, but stays eager
    graphs.run(run, x, [table], state=("other",))
    assert events == ["eager", "eager"]


def test_layers_off_cuda_never_capture():
    layers = _stack(2, "cpu")
    handle = apply_offloaded_checkpointing(layers, policy="recompute", cuda_graphs=True)
    x, dy = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    for _ in range(3):
        _step(layers, x, None, dy)
    assert all(w.graphs.captures == 0 and w.graphs.replays == 0 for w in _wrappers(layers))
    handle.revert()


# --- CUDA: capture and replay --------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("policy", ["offload", "recompute"])
def test_replayed_forwards_give_the_eager_outputs_and_gradients(policy):
    device = torch.device("cuda")
    eager, graphed = _stack(3, device), _stack(3, device)
    plain = apply_offloaded_checkpointing(eager, policy=policy)
    handle = apply_offloaded_checkpointing(graphed, policy=policy, cuda_graphs=True)
    gen = torch.Generator(device="cpu").manual_seed(1)
    for step in range(5):  # eager, capture (and a replay, or the process's first: an eager run), then replays
        x = torch.randn(2, 37, HIDDEN, generator=gen).to(device)
        table = (1 + torch.randn(HIDDEN, generator=gen) / 4).to(device)
        dy = torch.randn(2, 37, HIDDEN, generator=gen).to(device)
        want = _step(eager, x, table, dy)
        got = _step(graphed, x, table, dy)
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    # a forward and a backward graph a layer, each replayed in steps 3 to 5, and in step 2 after its capture (4 + 4),
    # but a thread's first capture, whose call ran eagerly to warm the capture stream up: the first forward capture
    # (layer 0, this thread) and the first backward one (layer 2, autograd's thread) when no test captured before
    assert [w.graphs.captures for w in _wrappers(graphed)] == [2, 2, 2]
    assert all(w.graphs.replays in (7, 8) for w in _wrappers(graphed))
    assert graphs_module.graph_pool_bytes() > 0
    plain.revert()
    handle.revert()


@cuda
def test_replayed_outputs_are_the_callers_own_tensors():
    device = torch.device("cuda")
    layers = _stack(2, device)
    handle = apply_offloaded_checkpointing(layers, policy="recompute", cuda_graphs=True)
    x = torch.randn(2, 9, HIDDEN, device=device, requires_grad=True)
    for _ in range(3):
        first = layers[0](x)
        second = layers[1](first)
    shared = {b.data_ptr() for b in graphs_module._BUFFERS.values()}
    assert first.data_ptr() not in shared and second.data_ptr() not in shared
    kept = first.detach().clone()
    layers[1](first)  # another replay writes the shared output buffer again
    torch.testing.assert_close(first.detach(), kept, atol=0, rtol=0)
    handle.revert()


@cuda
def test_a_new_shape_is_captured_on_its_own_and_both_stay_correct():
    eager, graphed = _pair(torch.device("cuda"))
    device = torch.device("cuda")
    for tokens in (16, 24, 16, 24, 16, 24):
        x, dy = torch.randn(1, tokens, HIDDEN, device=device), torch.randn(1, tokens, HIDDEN, device=device)
        for w, g in zip(_step(eager, x, None, dy), _step(graphed, x, None, dy), strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    (wrapper,) = _wrappers(graphed)
    # forward and backward, two shapes, each replayed at its capture and at the third call (a thread's first capture
    # runs its call eagerly instead: at most one forward and one backward)
    assert wrapper.graphs.captures == 4 and 6 <= wrapper.graphs.replays <= 8


@cuda
def test_dropout_layers_run_eagerly():
    _, layers = _pair(torch.device("cuda"), dropout=0.2)
    _steps(layers, 4)
    (wrapper,) = _wrappers(layers)
    assert wrapper.graphs.captures == 0 and wrapper.graphs.replays == 0


@cuda
def test_a_replaced_adapter_is_used_by_the_next_forward():
    device = torch.device("cuda")
    eager, graphed = _pair(device)
    x, dy = torch.randn(1, 8, HIDDEN, device=device), torch.randn(1, 8, HIDDEN, device=device)
    for _ in range(3):
        _step(graphed, x, None, dy)
    for layers in (eager, graphed):
        layers[0].lora_B = nn.Parameter(torch.full((INTER, RANK), 0.3, device=device))
    for _ in range(3):
        for w, g in zip(_step(eager, x, None, dy), _step(graphed, x, None, dy), strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_hooks_on_submodules_keep_a_layer_eager():
    layers = _stack(1, "cpu")
    handle = apply_offloaded_checkpointing(layers, policy="recompute", cuda_graphs=True)
    (wrapper,) = _wrappers(layers)
    assert wrapper.graph_plan() is not None
    hook = layers[0].up.register_forward_hook(lambda *_: None)
    layers[0].extra = nn.Identity()  # a registration: the layer is walked again
    assert wrapper.graph_plan() is None
    hook.remove()
    layers[0].extra2 = nn.Identity()
    assert wrapper.graph_plan() is not None
    everywhere = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    assert wrapper.graph_plan() is None
    everywhere.remove()
    assert wrapper.graph_plan() is not None
    handle.revert()


@cuda
def test_frozen_inputs_and_absent_output_gradients_are_replayed_right():
    """A layer whose input needs no gradient (the first layer over frozen embeddings) and whose adapters are partly
    frozen: the backward graph returns None where the eager backward does."""
    device = torch.device("cuda")
    eager, graphed = _stack(1, device), _stack(1, device)
    for layers in (eager, graphed):
        layers[0].lora_A.requires_grad_(False)
    apply_offloaded_checkpointing(eager, policy="offload")
    apply_offloaded_checkpointing(graphed, policy="offload", cuda_graphs=True)
    for _ in range(4):
        x = torch.randn(2, 16, HIDDEN, device=device)  # requires no grad
        dy = torch.randn(2, 16, HIDDEN, device=device)
        grads = []
        for layers in (eager, graphed):
            layers[0].lora_B.grad = None
            layers[0](x).backward(dy)
            grads.append(layers[0].lora_B.grad)
        torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
        assert graphed[0].lora_A.grad is None
    (wrapper,) = _wrappers(graphed)
    # calls 2 to 4 replayed, forward and backward (but a thread's first capture, eager)
    assert wrapper.graphs.captures == 2 and 4 <= wrapper.graphs.replays <= 6


class AutocastLoRALayer(nn.Module):
    """float32 adapters under bf16 autocast, as peft's are in training: the fused LoRA projection casts them (and
    keeps the forward's cast for the recompute), and a plain float32 linear goes through autocast's weight cache."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(INTER, HIDDEN) / 8, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(RANK, HIDDEN) / 8)
        self.lora_B = nn.Parameter(torch.randn(INTER, RANK) / 8)
        self.down = nn.Linear(INTER, HIDDEN, bias=False)  # trainable float32: autocast caches its bf16 cast

    def forward(self, x, table=None):
        from swiftune_kernels import lora_linear

        up = lora_linear(x, self.w.to(torch.bfloat16), self.lora_A, self.lora_B, 0.5)
        return x + self.down(torch.nn.functional.silu(up))


@cuda
def test_training_steps_under_autocast_match_eager():
    """Optimizer steps between the calls change the adapters in place: every replay must read the new values (the
    casts inside the graphs, not casts kept from the capture)."""
    device = torch.device("cuda")
    stacks = []
    for graphs in (False, True):
        torch.manual_seed(0)
        layers = nn.ModuleList(AutocastLoRALayer() for _ in range(2)).to(device)
        apply_offloaded_checkpointing(layers, policy="offload", cuda_graphs=graphs)
        stacks.append((layers, torch.optim.SGD([p for p in layers.parameters() if p.requires_grad], lr=0.5)))
    gen = torch.Generator(device="cpu").manual_seed(3)
    for step in range(6):
        x = torch.randn(2, 24, HIDDEN, generator=gen).to(device, torch.bfloat16)
        losses = []
        for layers, optimizer in stacks:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = x
                for layer in layers:
                    y = layer(y)
                loss = y.float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-3, rtol=1e-3, msg=f"step {step}")
    for (eager, _), (graphed, _) in zip([stacks[0]], [stacks[1]], strict=True):
        for p, q in zip(eager.parameters(), graphed.parameters(), strict=True):
            torch.testing.assert_close(q, p, atol=1e-3, rtol=1e-3)
    assert all(w.graphs.captures == 2 and w.graphs.replays in (9, 10) for w in _wrappers(stacks[1][0]))


# --- a capture that fails: these run last, because the first failure switches captures off for the process ------


class SyncingLayer(TinyLoRALayer):
    """Reads a value back to the host inside its forward, which a CUDA graph cannot capture."""

    def forward(self, x, table=None):
        if float(x.abs().amax()) < 0:
            raise AssertionError("unreachable")
        return super().forward(x, table)


@cuda
@pytest.mark.breaks_capture
def test_a_forward_that_cannot_be_captured_stays_eager_and_correct():
    device = torch.device("cuda")
    eager, graphed = _pair(device, layer=SyncingLayer)
    x, dy = torch.randn(1, 8, HIDDEN, device=device), torch.randn(1, 8, HIDDEN, device=device)
    with pytest.warns(UserWarning, match="could not be captured"):  # the first failure in this process
        for _ in range(4):
            for w, g in zip(_step(eager, x, None, dy), _step(graphed, x, None, dy), strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    (wrapper,) = _wrappers(graphed)
    assert wrapper.graphs.captures == 0 and wrapper.graphs.replays == 0
    assert wrapper.graphs.last_error is not None


@cuda
@pytest.mark.breaks_capture
def test_a_failed_capture_leaves_random_numbers_working():
    _, layers = _pair(torch.device("cuda"), layer=SyncingLayer)
    _steps(layers, 3)
    dropped = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), p=0.5)
    assert 300 < int((dropped == 0).sum()) < 700


@cuda
@pytest.mark.breaks_capture
def test_no_layer_is_captured_after_a_failed_capture():
    device = torch.device("cuda")
    _, syncing = _pair(device, layer=SyncingLayer)
    _steps(syncing, 3)  # captures fail here, unless an earlier test's failure already switched them off
    assert graphs_module._CAPTURE["failed"]
    _, fine = _pair(device)
    _steps(fine, 4)
    (wrapper,) = _wrappers(fine)
    assert wrapper.graphs.captures == 0
