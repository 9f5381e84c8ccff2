"""Parking through fixed slots (slot_parking), the form that parking takes with the layer graphs: a checkpointed
layer's forward copies the fused LoRA MLP's gate into a shared slot, the slot goes to the layer's host buffer, and
the recompute reads it back instead of computing it, with exactly the gradients of a recompute.

On the CPU the layer graphs stay off and the slots run eagerly through the same buffers (plain copies); on a GPU
the last tests replay the layers from CUDA graphs."""

import gc
import importlib

import pytest
import torch

from swiftune_kernels import apply_offloaded_checkpointing

host = importlib.import_module("swiftune_kernels.offload_host_copy")
slots = importlib.import_module("swiftune_kernels.slot_parking")
parking = importlib.import_module("swiftune_kernels.recompute_parking")
graphs_module = importlib.import_module("swiftune_kernels.layer_graphs")

HIDDEN, INTER, RANK = 16, 40, 4


@pytest.fixture(autouse=True)
def fresh_state(fresh_host_budget):
    """A fresh host budget (conftest) and no slot, before and after each test."""
    slots.release_slots()
    yield
    slots.release_slots()


@pytest.fixture
def stack(lora_mlp_stack):
    """``stack(n, device)``: n tiny LoRA MLP layers of this file's sizes."""
    return lambda n, device: lora_mlp_stack(n, device, HIDDEN, INTER, RANK)


def _forward(layers, x):
    h = x.clone().requires_grad_()
    y = h
    for layer in layers:
        y = layer(y)
    return h, y


def _grads(layers, x, dy, policy=None, park=False, steps=1):
    """Gradients of x and the adapters after ``steps`` forward-backward passes (summed over the steps)."""
    for p in layers.parameters():
        p.grad = None
    handle = (
        apply_offloaded_checkpointing(layers, policy, park_intermediates=park, cuda_graphs=True) if policy else None
    )
    try:
        for _ in range(steps):
            h, y = _forward(layers, x)
            y.backward(dy)
    finally:
        if handle is not None:
            handle.revert()
    return [h.grad, *(p.grad for p in layers.parameters() if p.requires_grad)]


def test_the_recompute_reads_the_gate_from_its_slot_with_the_very_gradients_of_a_recompute(base_matmuls, device, stack):
    layers = stack(3, device)  # layers 0 and 2 share a slot: layer 2's forward overwrites layer 0's gate there
    x = torch.randn(2, 5, HIDDEN, device=device)
    dy = torch.randn_like(x)
    plain = _grads(layers, x, dy)
    recomputed = _grads(layers, x, dy, "offload")
    base_matmuls.clear()
    parked = _grads(layers, x, dy, "offload", park=True)
    # forward: gate, up, down per layer; recompute: up only (gate from the slot, down skipped)
    assert len(base_matmuls) == 3 * 3 + 3
    for got, want, exact in zip(parked, recomputed, plain, strict=True):
        torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)
        torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
    assert len(slots._SLOTS) == slots.SLOTS  # one gate slot per parity, shared by the layers
    assert host.host_offload_bytes()[0] == 0 and host._HOST_BUDGET["shared"] == 0  # revert gave the buffers back


def test_each_step_parks_again_and_stays_exact(device, stack):
    layers = stack(2, device)
    x = torch.randn(3, HIDDEN, device=device)
    dy = torch.randn_like(x)
    want = _grads(layers, x, dy, "offload", steps=3)
    got = _grads(layers, x, dy, "offload", park=True, steps=3)  # on a GPU: eager, captured, replayed
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0.0, rtol=0.0)


def test_a_backward_after_a_second_forward_of_its_layers_computes_the_gate_again(base_matmuls, device, stack):
    layers = stack(2, device)
    xa, xb = torch.randn(3, HIDDEN, device=device), torch.randn(3, HIDDEN, device=device)
    handle = apply_offloaded_checkpointing(layers, "offload", park_intermediates=True, cuda_graphs=True)
    try:
        ha, ya = _forward(layers, xa)
        hb, yb = _forward(layers, xb)  # overwrites every layer's host buffer: A's gates are gone
        base_matmuls.clear()
        (ya.sum() + 2 * yb.sum()).backward()
        # B's layers read their gates back, A's compute theirs: 2 + 2 x 2 base matmuls
        assert len(base_matmuls) == 2 + 2 * 2
    finally:
        handle.revert()
    got = [ha.grad, hb.grad, *(p.grad.clone() for p in layers.parameters() if p.requires_grad)]
    for p in layers.parameters():
        p.grad = None
    ha2, ya2 = _forward(layers, xa)
    hb2, yb2 = _forward(layers, xb)
    (ya2.sum() + 2 * yb2.sum()).backward()
    want = [ha2.grad, hb2.grad, *(p.grad for p in layers.parameters() if p.requires_grad)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_layers_kept_on_the_device_and_the_default_do_not_park(base_matmuls, device, stack):
    layers = stack(2, device)
    x = torch.randn(3, HIDDEN, device=device)
    _grads(layers, x, torch.randn_like(x), "recompute", park=True)
    assert len(base_matmuls) == 2 * 3 + 2 * 2 and not slots._SLOTS
    base_matmuls.clear()
    _grads(layers, x, torch.randn_like(x), "offload")
    assert len(base_matmuls) == 2 * 3 + 2 * 2 and not slots._SLOTS


def test_host_buffers_past_the_parking_share_are_refused_and_the_gate_recomputed(base_matmuls, device, stack):
    layers = stack(3, device)
    x = torch.randn(4, HIDDEN, device=device)
    dy = torch.randn_like(x)
    one_input = sum(host.host_piece_sizes(x.numel() * 4))
    one_gate = x.shape[0] * INTER * 4
    bound = 1.5 * one_gate / slots.PARK_HOST_SHARE  # the parking share holds one layer's gate, not two
    assert 3 * one_input + one_gate <= bound
    want = _grads(layers, x, dy, "offload")
    host.set_host_offload_bytes(bound)
    base_matmuls.clear()
    got = _grads(layers, x, dy, "offload", park=True)
    assert len(base_matmuls) == 3 * 3 + 3 + 2  # one layer read its gate back, two computed theirs
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0.0, rtol=0.0)


def test_a_forward_without_backward_keeps_its_buffers_until_revert(device, stack):
    layers = stack(2, device)
    handle = apply_offloaded_checkpointing(layers, policy="offload", park_intermediates=True, cuda_graphs=True)
    _, y = _forward(layers, torch.randn(3, HIDDEN, device=device))
    assert host._HOST_BUDGET["shared"] == 2 * 3 * INTER * 4  # two layers' gates, kept for the next steps
    del y
    gc.collect()
    handle.revert()
    assert host.host_offload_bytes()[0] == 0 and host._HOST_BUDGET["shared"] == 0


def test_takes_match_the_name_shape_and_dtype_and_do_not_consume():
    slot_key = slots._slot("gate", torch.Size((3, 4)), torch.float32, torch.device("cpu"), 5)
    lot = slots._RecomputeLot((slot_key,))
    buffer = slots._SLOTS[slot_key].buffer
    assert slot_key[-1] == 5 % slots.SLOTS
    assert lot.take(("gate", 1), torch.Size((3, 4)), torch.float32) is buffer
    assert lot.take(("gate", 2), torch.Size((3, 4)), torch.float32) is buffer  # a capture's second run reads it too
    assert lot.take(("up", 1), torch.Size((3, 4)), torch.float32) is None
    assert lot.take(("gate", 1), torch.Size((4, 3)), torch.float32) is None
    assert lot.take(("gate", 1), torch.Size((3, 4)), torch.float64) is None


def test_a_forward_lot_parks_only_the_named_tensors_once_and_copies_at_once():
    lot = slots._ForwardLot(0)
    gate = torch.randn(3, 4)
    assert lot.park(("gate", 7), gate) and not lot.park(("gate", 7), gate) and not lot.park(("up", 8), gate)
    expected = gate.clone()
    gate.zero_()  # the kernel may write over what it offered: the slot holds a copy
    torch.testing.assert_close(slots._SLOTS[lot.parked[0]].buffer, expected, atol=0.0, rtol=0.0)
    other = slots._ForwardLot(1)  # the next layer writes its gate straight into the other slot
    buffer = other.destination(("gate", 9), torch.Size((3, 4)), torch.float32, "cpu")
    assert buffer is not slots._SLOTS[lot.parked[0]].buffer and other.parked[0][-1] == 1


def test_the_mlp_writes_parked_gate_and_up_into_their_slots_and_its_activation_elsewhere(monkeypatch, device, stack):
    layer = stack(1, device)[0]
    x = torch.randn(3, HIDDEN, device=device)
    with torch.no_grad():
        want = layer(x)
    for parked in (("gate",), ("up",), ("gate", "up")):
        monkeypatch.setattr(slots, "SLOT_PARKED", parked)
        slots.release_slots()
        lot = slots._ForwardLot(0)
        with torch.no_grad(), parking.parking_for_forward(lot):
            got = layer(x)
        torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)
        assert [key[0] for key in lot.parked] == list(parked)
        ga, gb, ua, ub, _, _ = layer.adapters
        x2 = torch.tanh(x)
        projections = {"gate": (layer.gate_w, ga, gb), "up": (layer.up_w, ua, ub)}
        for key in lot.parked:  # the slots hold the pre-activations, not the activation written after them
            w, a, b = projections[key[0]]
            torch.testing.assert_close(slots._SLOTS[key].buffer, x2 @ w.t() + 0.5 * (x2 @ a.t()) @ b.t())


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and pinned copies need CUDA")


@cuda_only
def test_cuda_replayed_layers_park_through_their_slots_and_match_eager(base_matmuls, stack):
    layers = stack(4, "cuda")
    x = torch.randn(2, 64, HIDDEN, device="cuda")
    dy = torch.randn_like(x)
    want = _grads(layers, x, dy, "offload", steps=5)  # graphs without parking
    handle = apply_offloaded_checkpointing(layers, "offload", park_intermediates=True, cuda_graphs=True)
    try:
        for p in layers.parameters():
            p.grad = None
        for _ in range(5):
            h, y = _forward(layers, x)
            y.backward(dy)
        wrappers = [layer.forward for layer in layers]
        assert all(w.graphs.replays > 0 for w in wrappers)  # replayed forwards and backwards
        host_buffers = [buffer for w in wrappers for buffer in w.parking._host.values()]
        assert len(host_buffers) == 4 and all(b.is_pinned() for b in host_buffers)
    finally:
        handle.revert()
    got = [h.grad, *(p.grad for p in layers.parameters() if p.requires_grad)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0.0, rtol=0.0)


@cuda_only
def test_cuda_a_slow_device_still_reads_each_layers_own_gate(stack):
    """The host queues the whole step while the device sleeps first: every slot write, copy and read must be ordered
    by the events alone."""
    layers = stack(6, "cuda")
    x = torch.randn(2, 256, HIDDEN, device="cuda")
    dy = torch.randn_like(x)
    want = _grads(layers, x, dy, "offload", steps=4)
    handle = apply_offloaded_checkpointing(layers, "offload", park_intermediates=True, cuda_graphs=True)
    try:
        for p in layers.parameters():
            p.grad = None
        for _ in range(4):
            torch.cuda._sleep(50_000_000)  # ~tens of ms of device time before the step's work
            h, y = _forward(layers, x)
            torch.cuda._sleep(20_000_000)
            y.backward(dy)
        torch.cuda.synchronize()
    finally:
        handle.revert()
    got = [h.grad, *(p.grad for p in layers.parameters() if p.requires_grad)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0.0, rtol=0.0)
