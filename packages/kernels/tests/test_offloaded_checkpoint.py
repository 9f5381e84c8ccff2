"""Offloaded checkpointing: gradients equal to no checkpointing (MLP stacks, a tiny HF Llama), RNG and autocast
restored for the recompute, tensor arguments and tuple outputs, the input released and prefetched in order,
revert, policy, errors. On a GPU the same tests run the CUDA copies, plus memory checks."""

import functools
import gc
import importlib
import weakref

import pytest
import torch
from torch import nn

from swiftune_kernels import apply_offloaded_checkpointing, offloaded_checkpoint
from swiftune_kernels.offloaded_checkpoint import OFFLOAD_MIN_ELEMENTS, checkpoint_policy

# The package re-exports the function under the submodule's name, so fetch the module itself.
op = importlib.import_module("swiftune_kernels.offloaded_checkpoint")
host = importlib.import_module("swiftune_kernels.offload_host_copy")

MODES = ["offload", "recompute"]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _live():
    """Host copies still waiting for their backward (the registry holds weak references)."""
    return [ref() for ref in host._PENDING if ref() is not None]


class Block(nn.Module):
    """Linear + SiLU + LayerNorm with a residual, and optional dropout: the shape of a decoder layer."""

    def __init__(self, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, hidden_states, scale=None, shift=(None, None)):
        out = self.down(self.drop(nn.functional.silu(self.up(self.norm(hidden_states)))))
        if scale is not None:
            out = out * scale
        for extra in shift:
            if extra is not None:
                out = out + extra
        return hidden_states + out


def _stack(hidden=13, layers=3, dropout=0.0, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    return nn.ModuleList(Block(hidden, dropout) for _ in range(layers)).to(device, dtype)


def _run(layers, x, **kwargs):
    for layer in layers:
        x = layer(x, **kwargs)
    return x


def _grads(layers, x, dy, seed=1, **kwargs):
    """Output, input gradient and parameter gradients of one forward+backward with the RNG seeded."""
    for p in layers.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = _run(layers, x, **kwargs)
    y.backward(dy)
    return y.detach(), x.grad, [p.grad for p in layers.parameters()]


def _checkpointed(tensor):
    """Whether ``tensor`` came out of the checkpoint (a plain call would give the same gradients, unsaved memory)."""
    return type(tensor.grad_fn).__name__ == "OffloadedCheckpointFunctionBackward"


def _bound(device, dtype=torch.float64):
    """Exact on the CPU: the recompute runs the same kernels on the same shapes in the same order. On a GPU the
    backward thread has its own cuBLAS handle, which may pick another kernel: allow a few roundings of the dtype."""
    if torch.device(device).type == "cpu":
        return {"atol": 0.0, "rtol": 0.0}
    eps = torch.finfo(dtype).eps
    return {"atol": 8 * eps, "rtol": 8 * eps}


def _assert_same(got, want, bound):
    y, dx, dps = got
    y0, dx0, dps0 = want
    torch.testing.assert_close(y, y0, **bound)
    torch.testing.assert_close(dx, dx0, **bound)
    assert len(dps) == len(dps0) and all(g is not None for g in dps)
    for g, g0 in zip(dps, dps0, strict=True):
        torch.testing.assert_close(g, g0, **bound)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "dropout"])
def test_stack_matches_no_checkpointing(mode, dtype, dropout, device):
    layers = _stack(dropout=dropout, dtype=dtype, device=device).train()
    x = torch.randn(2, 7, 13, dtype=dtype, device=device)
    dy = torch.randn_like(x)
    want = _grads(layers, x, dy)
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o: calls.append(_checkpointed(o))) for layer in layers]
    handle = apply_offloaded_checkpointing(layers, policy=mode)
    got = _grads(layers, x, dy)
    handle.revert()
    _assert_same(got, want, _bound(device, dtype))
    assert calls == [True] * len(layers)  # hooks stay outside the checkpoint: they do not run again in the recompute
    for hook in hooks:
        hook.remove()


def test_dropout_needs_the_rng_restored():
    """Without restoring the RNG the recompute draws other dropout masks: proves the dropout test can fail."""
    layers = _stack(dropout=0.5).train()
    x, dy = torch.randn(2, 7, 13, dtype=torch.float64), torch.randn(2, 7, 13, dtype=torch.float64)
    want = _grads(layers, x, dy)
    with apply_offloaded_checkpointing(layers, policy="offload", preserve_rng_state=False):
        got = _grads(layers, x, dy)
    assert not torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)  # forward itself is unchanged


@pytest.mark.parametrize("mode", MODES)
def test_tensor_arguments_get_gradients(mode, device):
    """A positional tensor and tensors nested in a keyword tuple (like position_embeddings) that require grad."""
    layers = _stack(device=device)
    x = torch.randn(3, 5, 13, dtype=torch.float64, device=device)
    dy = torch.randn_like(x)

    def grads(checkpointed):
        scale = torch.linspace(0.5, 1.5, 13, dtype=torch.float64, device=device).requires_grad_()
        shift = (torch.randn(5, 13, dtype=torch.float64, device=device).requires_grad_(), None)
        torch.manual_seed(3)
        shift[0].data.normal_()
        h = x.detach().requires_grad_()
        out = h
        for layer in layers:
            if checkpointed:
                out = offloaded_checkpoint(layer, out, scale, offload=mode == "offload", shift=shift)
            else:
                out = layer(out, scale, shift=shift)
        out.backward(dy)
        return [h.grad, scale.grad, shift[0].grad, *(p.grad for p in layers.parameters())]

    want = grads(False)
    layers.zero_grad(set_to_none=True)
    got = grads(True)
    for g, g0 in zip(got, want, strict=True):
        torch.testing.assert_close(g, g0, **_bound(device))


class TupleLayer(nn.Module):
    """Returns (hidden, aux tensor, None, a string), like an older transformers layer with attention weights."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, hidden_states, attention_mask=None):
        h = hidden_states + torch.tanh(self.proj(hidden_states))
        aux = self.proj.weight.sum() * h.mean(-1)
        return h, aux, None, "not a tensor"


@pytest.mark.parametrize("mode", MODES)
def test_tuple_output(mode, device):
    torch.manual_seed(0)
    layers = nn.ModuleList(TupleLayer(11) for _ in range(2)).to(device, torch.float64)
    x = torch.randn(2, 3, 11, dtype=torch.float64, device=device)

    def grads():
        layers.zero_grad(set_to_none=True)
        h, total = x.detach().requires_grad_(), 0
        out = h
        for layer in layers:
            out, aux, nothing, text = layer(out, attention_mask=None)
            assert nothing is None and text == "not a tensor"
            total = total + aux.square().sum()
        (out.sum() + total).backward()
        return [h.grad, *(p.grad for p in layers.parameters())]

    want = grads()
    with apply_offloaded_checkpointing(layers, policy=mode):
        got = grads()
    for g, g0 in zip(got, want, strict=True):
        torch.testing.assert_close(g, g0, **_bound(device))


def test_frozen_layer_input_without_grad_still_trains_parameters():
    """LoRA over frozen embeddings: no input requires grad, yet the layer's trainable weights get gradients."""
    layers = _stack()
    for layer in layers:
        layer.up.requires_grad_(False)
    x, dy = torch.randn(2, 7, 13, dtype=torch.float64), torch.randn(2, 7, 13, dtype=torch.float64)

    def grads():
        layers.zero_grad(set_to_none=True)
        _run(layers, x).backward(dy)
        return [p.grad for p in layers.parameters()]

    want = grads()
    with apply_offloaded_checkpointing(layers, policy="offload"):
        got = grads()
        assert _checkpointed(layers[0](x))
    for g, g0 in zip(got, want, strict=True):
        assert (g is None) == (g0 is None)
        if g is not None:
            torch.testing.assert_close(g, g0, atol=0, rtol=0)
    assert layers[0].up.weight.grad is None and layers[0].down.weight.grad is not None


def test_parameters_found_behind_a_partial():
    """accelerate-style ``functools.partial(new_forward, module)`` forwards: the parameters are still found, so they
    get gradients although no input requires grad (only the explicit-parameter path can do that)."""
    layers = _stack(layers=2)
    x, dy = torch.randn(2, 7, 13, dtype=torch.float64), torch.randn(2, 7, 13, dtype=torch.float64)

    def grads():
        layers.zero_grad(set_to_none=True)
        _run(layers, x).backward(dy)
        return [p.grad for p in layers.parameters()]

    want = grads()
    for layer in layers:
        layer.forward = functools.partial(lambda module, h: type(module).forward(module, h), layer)
    handle = apply_offloaded_checkpointing(layers, policy="offload")
    got = grads()
    assert _checkpointed(layers[0](x))
    handle.revert()
    for g, g0 in zip(got, want, strict=True):
        torch.testing.assert_close(g, g0, atol=0, rtol=0)
    h = offloaded_checkpoint(layers[0].forward, x, offload=True)
    assert _checkpointed(h)


def test_closure_without_visible_parameters():
    """A lambda hides the module: gradients reach its parameters through .grad accumulation instead."""
    layers = _stack()
    x, dy = torch.randn(2, 7, 13, dtype=torch.float64), torch.randn(2, 7, 13, dtype=torch.float64)
    want = _grads(layers, x, dy)
    for p in layers.parameters():
        p.grad = None
    h = x.detach().requires_grad_()
    out = h
    for layer in layers:
        out = offloaded_checkpoint(lambda t, m=layer: m(t), out, offload=True)
    out.backward(dy)
    _assert_same((out.detach(), h.grad, [p.grad for p in layers.parameters()]), want, _bound("cpu"))


def test_autocast_state_is_restored_for_the_recompute():
    """Forward under CPU autocast (bf16 matmuls), backward outside it, as trainers do: the recompute must match."""
    layers = _stack(dtype=torch.float32)
    x, dy = torch.randn(2, 7, 13), torch.randn(2, 7, 13)

    def grads():
        layers.zero_grad(set_to_none=True)
        h = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = _run(layers, h)
        assert y.dtype == torch.float32  # LayerNorm + residual: autocast runs the matmuls only in bf16
        y.backward(dy)
        return y.detach(), h.grad, [p.grad for p in layers.parameters()]

    want = grads()
    with apply_offloaded_checkpointing(layers, policy="offload"):
        got = grads()
    _assert_same(got, want, _bound("cpu"))


@pytest.mark.parametrize("mode", MODES)
def test_tiny_hf_llama_matches_no_checkpointing(mode):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        attention_dropout=0.2,  # dropout inside attention: the recompute must draw the same mask
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().train()
    ids = torch.randint(0, 97, (2, 9))

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss  # use_cache defaults on: the wrapper switches it off
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss0, want = grads()
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in model.model.layers]
    with pytest.warns(UserWarning, match="KV cache"):
        handle = apply_offloaded_checkpointing(model.model.layers, policy=mode)
        loss, got = grads()
    handle.revert()
    assert len(outputs) == 2 and all(_checkpointed(o[0] if isinstance(o, tuple) else o) for o in outputs)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(loss, loss0, atol=0, rtol=0)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0, msg=name)
    # transformers' own checkpointing on top of ours would recompute twice: refused with a way out.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        apply_offloaded_checkpointing(model.model.layers)


def test_recompute_runs_and_no_grad_does_not_checkpoint():
    layer = _stack(layers=1)[0]
    calls = []
    original = layer.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    x = torch.randn(2, 3, 13, dtype=torch.float64)
    with torch.no_grad():
        y0 = offloaded_checkpoint(counting, x, offload=True)
    assert len(calls) == 1 and not _live()
    y = offloaded_checkpoint(counting, x.requires_grad_(), offload=True)
    assert len(calls) == 2  # the closure path: forward only so far
    y.sum().backward()
    assert len(calls) == 3  # recomputed in backward
    torch.testing.assert_close(y.detach(), y0, atol=0, rtol=0)


def test_revert_restores_forward():
    layers = _stack(layers=2)
    layers[1].forward = lambda hidden_states: hidden_states * 2  # an earlier instance patch (accelerate-style)
    earlier = layers[1].__dict__["forward"]
    handle = apply_offloaded_checkpointing(layers)
    wrapper_type = importlib.import_module("swiftune_kernels.layer_checkpointing")._CheckpointedForward
    assert all(isinstance(layer.__dict__["forward"], wrapper_type) for layer in layers)
    assert handle.layers == list(layers)
    with pytest.raises(ValueError, match="already has offloaded checkpointing"):
        apply_offloaded_checkpointing(layers)
    x = torch.randn(2, 13, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layers[1](x), 2 * x)  # hidden_states= by keyword works too
    torch.testing.assert_close(layers[1](hidden_states=x), 2 * x)
    handle.revert()
    assert "forward" not in layers[0].__dict__
    assert layers[1].__dict__["forward"] is earlier
    # A patch applied after ours must be undone first.
    handle = apply_offloaded_checkpointing(layers[:1])
    layers[0].forward = lambda hidden_states: hidden_states
    with pytest.raises(RuntimeError, match="reverse order"):
        handle.revert()


def test_offload_releases_the_input_and_recompute_keeps_it():
    layer = _stack(layers=1)[0]
    kept = {}
    for mode in MODES:
        x = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
        h = x * 1.0  # a non-leaf, as the previous layer's output is
        ref = weakref.ref(h)
        y = offloaded_checkpoint(layer, h, offload=mode == "offload")
        del h
        gc.collect()
        kept[mode] = ref() is not None
        y.sum().backward()
        assert x.grad is not None
    assert kept == {"offload": False, "recompute": True}


def test_backward_prefetches_the_previous_layer_first(monkeypatch):
    log, order = [], {}
    init, prefetch, fetch = host.HostCopy.__init__, host.HostCopy.prefetch, host.HostCopy.fetch

    def numbered_init(self, tensor, *args, **kwargs):
        init(self, tensor, *args, **kwargs)
        order[id(self)] = len(order)

    def logged_prefetch(self):
        log.append(("prefetch", order[id(self)]))
        prefetch(self)

    def logged_fetch(self):
        log.append(("fetch", order[id(self)]))
        return fetch(self)

    monkeypatch.setattr(host.HostCopy, "prefetch", logged_prefetch)
    monkeypatch.setattr(host.HostCopy, "fetch", logged_fetch)
    monkeypatch.setattr(host.HostCopy, "__init__", numbered_init)
    layers = _stack(layers=3)
    with apply_offloaded_checkpointing(layers, policy="offload"):
        y = _run(layers, torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True))
        assert len(_live()) == 3
        y.sum().backward()
    # Layer 2's backward uploads its own input, then starts layer 1's; layer 1 then starts layer 0's.
    assert log == [
        ("fetch", 2), ("prefetch", 2), ("prefetch", 1),
        ("fetch", 1), ("prefetch", 1), ("prefetch", 0),
        ("fetch", 0), ("prefetch", 0),
    ]  # fmt: skip
    assert not _live()


def test_graph_dropped_without_backward_leaks_nothing():
    layers = _stack(layers=3)
    with apply_offloaded_checkpointing(layers, policy="offload"):
        y = _run(layers, torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True))
        del y
        gc.collect()
        z = _run(layers, torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True))
    assert len(host._PENDING) == 3  # the first graph's three (dead) entries were purged, not just left behind
    z.sum().backward()
    assert not _live()


def test_retain_graph_twice():
    layer = _stack(layers=1)[0]
    x = torch.randn(2, 13, dtype=torch.float64, requires_grad=True)
    y = offloaded_checkpoint(layer, x, offload=False)
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)
    y = offloaded_checkpoint(layer, x, offload=True)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.sum().backward()


def test_checkpoint_policy():
    assert checkpoint_policy(1 << 20, 4096, device="cpu") == "recompute"
    assert checkpoint_policy(128, 4096) == "recompute"
    assert checkpoint_policy(OFFLOAD_MIN_ELEMENTS // 4096, 4096) == "offload"
    assert checkpoint_policy(OFFLOAD_MIN_ELEMENTS // 4096 - 1, 4096) == "recompute"
    assert checkpoint_policy(OFFLOAD_MIN_ELEMENTS // 4096 // 4, 4096, batch_size=4) == "offload"
    assert checkpoint_policy(100, 10, min_elements=1000) == "offload"
    with pytest.raises(ValueError, match="seq_len"):
        checkpoint_policy(0, 4096)
    with pytest.raises(ValueError, match="policy"):
        apply_offloaded_checkpointing(_stack(layers=1), policy="sometimes")


def test_auto_policy_on_cpu_keeps_the_input():
    """Auto on the CPU means plain recomputation: the input is saved, no host copy is made."""
    layer = _stack(layers=1)[0]
    y = offloaded_checkpoint(layer, torch.randn(2, 13, dtype=torch.float64, requires_grad=True))
    assert not _live() and y.grad_fn is not None


def test_errors():
    layer = _stack(layers=1)[0]
    with pytest.raises(TypeError, match="callable"):
        offloaded_checkpoint("layer", torch.randn(2, 13))
    with pytest.raises(TypeError, match="floating-point"):
        offloaded_checkpoint(layer, torch.ones(2, 13, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        offloaded_checkpoint(layer, [1.0, 2.0])
    with pytest.raises(TypeError, match="nn.Module"):
        apply_offloaded_checkpointing([layer, "layer"])
    with apply_offloaded_checkpointing([layer]):
        with pytest.raises(TypeError, match="hidden_states"):
            layer()
    with pytest.raises(TypeError, match="no tensor"):
        offloaded_checkpoint(lambda t: None, torch.randn(2, 13, requires_grad=True))


# --- on a GPU: the CUDA copies, pinned memory, and what they buy -----------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_offload_uses_pinned_memory_and_matches(dtype):
    layers = _stack(hidden=256, layers=4, dropout=0.1, dtype=dtype, device="cuda").train()
    x = torch.randn(2, 300, 256, dtype=dtype, device="cuda")
    dy = torch.randn_like(x)
    want = _grads(layers, x, dy)
    with apply_offloaded_checkpointing(layers, policy="offload"):
        h = x.detach().requires_grad_()
        torch.manual_seed(1)
        y = _run(layers, h)
        copies = _live()
        assert len(copies) == 4 and all(c.host.is_pinned() for c in copies)
        del copies
        y.backward(dy)
        got = (y.detach(), h.grad, [p.grad for p in layers.parameters()])
    _assert_same(got, want, _bound("cuda", dtype))


@cuda_only
def test_cuda_offload_holds_no_layer_inputs_on_the_gpu():
    hidden, tokens, n = 1024, 4096, 6
    layers = _stack(hidden=hidden, layers=n, dtype=torch.bfloat16, device="cuda")
    layers.requires_grad_(False)  # LoRA-like: only activations count

    def held_after_forward(mode):
        x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with apply_offloaded_checkpointing(layers, policy=mode):
            y = _run(layers, x)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        y.float().sum().backward()
        return held

    one_input = tokens * hidden * 2
    recompute, offload = held_after_forward("recompute"), held_after_forward("offload")
    # Recompute keeps layers 1..n-1's inputs (layer 0's is x itself) plus the output; offload keeps the output, and
    # at most the newest input until a later copy or the backward releases it (offload_host_copy.HELD_SOURCES).
    assert recompute >= n * one_input
    assert offload <= 2.5 * one_input


@cuda_only
def test_a_host_ahead_of_the_device_holds_at_most_one_offloaded_input():
    """With record_stream, an offloaded input's block came back only once the host saw its copy done, so a host far
    ahead of the device (a step replayed from CUDA graphs) held every layer's input at once."""
    hidden, tokens, n = 1024, 4096, 8
    layers = _stack(hidden=hidden, layers=n, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    want = _grads(layers, x, dy)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of device time: the forward below is issued while the device is busy
    with apply_offloaded_checkpointing(layers, policy="offload"):
        h = x.detach().requires_grad_()
        y = _run(layers, h)
        held = torch.cuda.memory_allocated() - before
        ahead = not torch.cuda.current_stream().query()
        y.backward(dy)
    assert ahead, "the device caught up with the host; the test proves nothing"
    # the output, the newest input, and one layer's intermediate at most; n inputs before
    assert held <= 3 * tokens * hidden * 2
    _assert_same((y.detach(), h.grad, [p.grad for p in layers.parameters()]), want, _bound("cuda", torch.bfloat16))


@cuda_only
def test_a_host_ahead_of_the_device_in_backward_holds_no_pile_of_uploaded_inputs():
    """Uploads allocated on their own stream came back only once the host saw the main stream's work done, so a
    backward issued far ahead of the device (layers replayed from CUDA graphs) held every uploaded input at once."""
    hidden, tokens, n = 256, 32768, 8
    one_input = tokens * hidden * 2
    layers = _stack(hidden=hidden, layers=n, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    want = _grads(layers, x, dy)
    seen = []  # memory allocated as the host issues each layer's backward (a gradient hook runs at issue time)
    with apply_offloaded_checkpointing(layers, policy="offload"):
        h = x.detach().requires_grad_()
        y = h
        for layer in layers:
            y = layer(y)
            if layer is not layers[-1]:
                y.register_hook(lambda grad: seen.append(torch.cuda.memory_allocated()))
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of device time: the backward below is issued while it is busy
        y.backward(dy)
        ahead = not torch.cuda.current_stream().query()
    assert ahead, "the device caught up with the host; the test proves nothing"
    assert len(seen) == n - 1
    grads = sum(p.numel() * p.element_size() for p in layers.parameters())
    # the same few inputs alive at each layer (its own, the next one's upload), and the parameters' gradients;
    # before, one more uploaded input per layer: (n - 2) x one_input more by the last layer
    assert seen[-1] - seen[0] <= grads + one_input
    _assert_same((y.detach(), h.grad, [p.grad for p in layers.parameters()]), want, _bound("cuda", torch.bfloat16))


def test_per_layer_modes_keep_or_drop_activations_with_identical_gradients():
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)) for _ in range(2)])
    x = torch.randn(4, 8, requires_grad=True)

    def run() -> tuple[int, list[torch.Tensor]]:
        saved = 0

        def pack(t):
            nonlocal saved
            saved += 1
            return t

        layers.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = x
            for layer in layers:
                h = layer(h)
        h.square().sum().backward()
        return saved, [x.grad.clone(), *(p.grad.clone() for p in layers.parameters())]

    plain_saved, expected = run()
    handle = apply_offloaded_checkpointing(layers, policy="recompute")
    assert handle.modes == ["recompute", "recompute"]
    all_saved, grads_all = run()
    handle.set_modes(["none", "recompute"])
    assert handle.modes == ["none", "recompute"]
    mixed_saved, grads_mixed = run()
    # An un-checkpointed layer saves what it saves without checkpointing; a checkpointed one only its inputs.
    assert all_saved < mixed_saved < plain_saved
    for got_all, got_mixed, want in zip(grads_all, grads_mixed, expected, strict=True):
        torch.testing.assert_close(got_all, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_mixed, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one mode per layer"):
        handle.set_modes(["none"])
    with pytest.raises(ValueError, match="mode must be one of"):
        handle.set_modes(["none", "sometimes"])
    handle.revert()


class Adaptable(nn.Module):
    """A layer whose forward uses an adapter when one has been attached (as peft does after wrapping)."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(6, 6)

    def forward(self, x):
        y = self.base(x)
        adapter = getattr(self, "adapter", None)
        return y if adapter is None else y + adapter(x)


def test_parameters_added_or_unfrozen_after_wrapping_get_gradients():
    """The wrapper walks a layer's parameters once, but an adapter attached later, or a parameter unfrozen later,
    still gets its gradient (and a frozen one none)."""
    torch.manual_seed(0)
    layer = Adaptable()
    layer.base.weight.requires_grad_(False)
    x = torch.randn(3, 6)
    with apply_offloaded_checkpointing([layer], policy="recompute"):
        layer(x).sum().backward()
        assert layer.base.weight.grad is None and layer.base.bias.grad is not None
        layer.adapter = nn.Linear(6, 6, bias=False)  # attached after the wrapper first ran
        layer.base.bias.grad = None
        layer(x).sum().backward()
        expected = torch.autograd.grad(Adaptable.forward(layer, x).sum(), layer.adapter.weight)[0]
        torch.testing.assert_close(layer.adapter.weight.grad, expected)
        layer.base.weight.requires_grad_(True)  # unfrozen later
        layer(x).sum().backward()
        assert layer.base.weight.grad is not None


def test_a_layer_is_walked_again_only_after_a_registration_inside_it():
    """Registrations outside the checkpointed layers (transformers slices its layer list into a new ModuleList on
    every forward) do not make the wrapper walk the layer's modules again; an adapter attached inside the layer, or
    a parameter registered on that adapter later, does."""
    torch.manual_seed(0)
    layer = Adaptable()
    x = torch.randn(3, 6)
    with apply_offloaded_checkpointing([layer], policy="recompute"):
        wrapper, walks = layer.forward, []
        walk = wrapper.parameters
        wrapper.parameters = lambda: walks.append(1) or walk()

        def step() -> int:
            layer(x).sum().backward()
            return len(walks)

        assert step() == 1  # the first call walks
        nn.ModuleList([layer])  # as `self.layers[:n]` does on every forward
        nn.Linear(2, 2)  # a module built elsewhere registers its own parameters
        assert step() == 1
        layer.adapter = nn.Linear(6, 6, bias=False)
        assert step() == 2
        assert layer.adapter.weight.grad is not None
        layer.adapter.register_parameter("bias", nn.Parameter(torch.zeros(6)))
        assert step() == 3
        assert layer.adapter.bias.grad is not None
