"""Intermediates parked by a checkpointed layer's forward for its recompute: the fused LoRA MLP's gate and up go to
the host with the layer's input and come back instead of being computed again, with the same gradients."""

import gc
import importlib

import pytest
import torch

from swiftune_kernels import apply_offloaded_checkpointing

host = importlib.import_module("swiftune_kernels.offload_host_copy")
parking = importlib.import_module("swiftune_kernels.recompute_parking")
mlp_module = importlib.import_module("swiftune_kernels.lora_mlp")

HIDDEN, INTER, RANK = 16, 40, 4


pytestmark = pytest.mark.usefixtures("fresh_host_budget")  # conftest: no copies counted before and after each test


@pytest.fixture
def stack(lora_mlp_stack):
    """``stack(n, device)``: n tiny LoRA MLP layers of this file's sizes."""
    return lambda n, device: lora_mlp_stack(n, device, HIDDEN, INTER, RANK)


@pytest.fixture
def steady_link(monkeypatch):
    """On CUDA, whether a tiny copy is seen finished depends on timing: the tests that count parks take the link as
    keeping up (its rule has a test of its own)."""
    monkeypatch.setattr(parking, "_link_keeps_up", lambda device: True)


def _grads(layers, x, dy, checkpointing=None, park=True):
    for p in layers.parameters():
        p.grad = None
    handle = (
        apply_offloaded_checkpointing(layers, policy=checkpointing, park_intermediates=park) if checkpointing else None
    )
    try:
        h = x.clone().requires_grad_()
        y = h
        for layer in layers:
            y = layer(y)
        y.backward(dy)
    finally:
        if handle is not None:
            handle.revert()
    return [h.grad, *(p.grad for p in layers.parameters() if p.requires_grad)]


def test_parked_gate_and_up_give_the_same_gradients_without_being_computed_again(
    base_matmuls, steady_link, device, stack
):
    layers = stack(3, device)
    x = torch.randn(2, 5, HIDDEN, device=device)
    dy = torch.randn_like(x)
    plain = _grads(layers, x, dy)
    base_matmuls.clear()
    recomputed = _grads(layers, x, dy, "offload", park=False)
    # forward: gate, up, down per layer; recompute: gate and up again (down is skipped)
    assert len(base_matmuls) == 3 * 3 + 2 * 3
    base_matmuls.clear()
    parked = _grads(layers, x, dy, "offload", park=True)
    assert len(base_matmuls) == 3 * 3  # the recompute took gate and up back from the host
    for got, want, exact in zip(parked, recomputed, plain, strict=True):
        torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)  # the very values the recompute would make
        torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
    assert host.host_offload_bytes()[0] == 0 and host._HOST_BUDGET["shared"] == 0


def test_layers_kept_on_the_device_do_not_park(base_matmuls, steady_link, device, stack):
    layers = stack(2, device)
    x = torch.randn(3, HIDDEN, device=device)
    _grads(layers, x, torch.randn_like(x), "recompute", park=True)
    assert len(base_matmuls) == 2 * 3 + 2 * 2


def test_parks_past_their_share_of_the_host_bound_are_recomputed(base_matmuls, steady_link, device, stack):
    layers = stack(3, device)
    x = torch.randn(4, HIDDEN, device=device)
    dy = torch.randn_like(x)
    one_input = sum(host.host_piece_sizes(x.numel() * 4))
    one_park = sum(host.host_piece_sizes(x.shape[0] * INTER * 4))
    bound = one_park / parking.PARK_HOST_SHARE  # the parking share holds exactly one gate or up
    assert 3 * one_input + one_park <= bound  # and the three layer inputs fit beside it
    host.set_host_offload_bytes(bound)
    got = _grads(layers, x, dy, "offload")
    assert len(base_matmuls) == 3 * 3 + 2 * 3 - 1  # one projection came back from the host, five were recomputed
    for g, w in zip(got, _grads(layers, x, dy), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_a_graph_freed_without_backward_gives_the_parked_bytes_back(steady_link, device, stack):
    layers = stack(2, device)
    handle = apply_offloaded_checkpointing(layers, policy="offload", park_intermediates=True)
    y = torch.randn(3, HIDDEN, device=device, requires_grad=True)
    for layer in layers:
        y = layer(y)
    assert host._HOST_BUDGET["shared"] > 0
    del y
    gc.collect()
    handle.revert()
    assert host.host_offload_bytes()[0] == 0 and host._HOST_BUDGET["shared"] == 0


def test_a_take_that_does_not_match_drops_everything_parked():
    lot = parking.ParkingLot()
    first, second = torch.randn(3, 4), torch.randn(3, 4)
    assert lot.park("a", first) and lot.park("b", second)
    torch.testing.assert_close(lot.take("a", first.shape, first.dtype), first, atol=0.0, rtol=0.0)
    assert lot.take("a", second.shape, second.dtype) is None  # "b" was next: the recompute went another way
    assert len(lot) == 0 and host._HOST_BUDGET["shared"] == 0
    assert lot.park("c", first)
    assert lot.take("c", torch.Size((4, 3)), first.dtype) is None  # same key, another shape
    assert lot.take("c", first.shape, torch.float64) is None and host._HOST_BUDGET["shared"] == 0


def test_nothing_parks_outside_a_checkpointed_forward():
    assert not parking.park_for_recompute("a", torch.randn(2))
    assert parking.take_parked("a", torch.Size((2,)), torch.float32) is None


def test_parking_is_off_by_default_and_the_handle_switches_it(base_matmuls, steady_link, device, stack):
    layers = stack(2, device)
    handle = apply_offloaded_checkpointing(layers, policy="offload")
    try:
        for park, computed in ((False, 2 * 3 + 2 * 2), (True, 2 * 3)):  # off: gate and up recomputed
            assert handle.park_intermediates is park
            base_matmuls.clear()
            y = torch.randn(3, HIDDEN, device=device, requires_grad=True)
            for layer in layers:
                y = layer(y)
            y.sum().backward()
            assert len(base_matmuls) == computed
            handle.park_intermediates = True
    finally:
        handle.revert()


def test_only_the_named_projections_are_parked(base_matmuls, monkeypatch, steady_link, device, stack):
    monkeypatch.setattr(mlp_module, "PARKED_PROJECTIONS", ("gate",))
    layers = stack(2, device)
    x = torch.randn(3, HIDDEN, device=device)
    _grads(layers, x, torch.randn_like(x), "offload", park=True)
    assert len(base_matmuls) == 2 * 3 + 2  # up recomputed, gate taken back


class _Event:
    def __init__(self, done):
        self.done = done

    def query(self):
        return self.done


def test_parking_pauses_while_the_downloads_fall_behind_the_compute(monkeypatch):
    device, waited = torch.device("cuda", 0), []

    class Stream:
        def wait_event(self, event):
            waited.append(event)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(parking, "_IN_FLIGHT", parking.collections.deque())
    behind = (device, _Event(True), _Event(False))  # the compute passed its queue point, its download runs on
    parking._IN_FLIGHT.extend([(device, _Event(True), _Event(True)), behind])
    assert parking._link_keeps_up(device)  # one behind: park
    assert len(parking._IN_FLIGHT) == 1  # the finished copy is forgotten
    parking._IN_FLIGHT.append((device, _Event(True), _Event(False)))
    assert not parking._link_keeps_up(device)  # PARK_MAX_BEHIND behind: compute instead
    assert waited == []
    ahead = [(device, _Event(False), _Event(False)) for _ in range(parking.PARK_MAX_IN_FLIGHT)]
    parking._IN_FLIGHT.clear()
    parking._IN_FLIGHT.extend(ahead)  # queued ahead of the compute, none behind yet
    assert parking._link_keeps_up(device)
    assert waited == [ahead[0][2]]  # but that many unfinished: the main stream waits for the oldest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host copies and side streams need CUDA")
def test_cuda_parked_tensors_are_pinned_and_give_the_same_gradients(stack):
    layers = stack(3, "cuda")
    x = torch.randn(2, 64, HIDDEN, device="cuda")
    dy = torch.randn_like(x)
    pinned = []
    original = host.HostCopy.__init__

    def spying_init(self, tensor, *args, **kwargs):
        original(self, tensor, *args, **kwargs)
        pinned.append(self.host.is_pinned())

    recomputed = _grads(layers, x, dy, "offload", park=False)
    host.HostCopy.__init__ = spying_init
    try:
        parked = _grads(layers, x, dy, "offload", park=True)
    finally:
        host.HostCopy.__init__ = original
    assert len(pinned) == 3 * 3 and all(pinned)  # each layer: its input, gate and up
    for got, want in zip(parked, recomputed, strict=True):
        torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)
