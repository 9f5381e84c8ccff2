"""The bound on the host memory that offloaded layer inputs hold: past it, layers keep their input on the device
(a host out of memory kills the process; a device one is an exception the trainer reports)."""

import gc
import importlib
import warnings

import pytest
import torch
from torch import nn

from swiftune_kernels import offloaded_checkpoint

host = importlib.import_module("swiftune_kernels.offload_host_copy")


pytestmark = pytest.mark.usefixtures("fresh_host_budget")  # conftest: no copies counted before and after each test


def _layers(n):
    torch.manual_seed(0)
    return nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(n)).double()


def test_layers_past_the_bound_keep_their_input_and_the_gradients_do_not_change(monkeypatch, stack_grads):
    layers, x = _layers(4), torch.randn(2, 3, 16, dtype=torch.float64)
    dy = torch.randn_like(x)
    per_copy = sum(host.host_piece_sizes(x.numel() * 8))
    host.set_host_offload_bytes(2 * per_copy)  # room for two layer inputs
    copies, peak = [], []
    original = host.HostCopy.__init__

    def counting_init(self, tensor, *args, **kwargs):
        original(self, tensor, *args, **kwargs)
        copies.append(self)
        peak.append(host.host_offload_bytes()[0])

    monkeypatch.setattr(host.HostCopy, "__init__", counting_init)
    with pytest.warns(UserWarning, match="keep their input on the GPU"):
        got = stack_grads(layers, x, dy, checkpointed=True)
    assert len(copies) == 2 and max(peak) == 2 * per_copy  # the first two layers offloaded, the others not
    assert host.host_offload_bytes()[0] == 0  # every copy gave its bytes back when fetched
    copies.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not every step
        stack_grads(layers, x, dy, checkpointed=True)
    assert len(copies) == 2
    for g, w in zip(got, stack_grads(layers, x, dy, checkpointed=False), strict=True):
        torch.testing.assert_close(g, w, atol=0.0, rtol=0.0)


def test_a_graph_freed_without_backward_gives_its_bytes_back():
    layers, x = _layers(3), torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    y = x
    for layer in layers:
        y = offloaded_checkpoint(layer, y, offload=True)
    assert host.host_offload_bytes()[0] == 3 * sum(host.host_piece_sizes(x.numel() * 8))
    del y
    gc.collect()
    assert host.host_offload_bytes()[0] == 0


def test_the_bound_is_measured_at_the_first_copy(monkeypatch):
    monkeypatch.setattr(host, "available_host_bytes", lambda: 1000.0 * 2**20)
    layers, x = _layers(1), torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    assert host.host_offload_bytes() == (0, None)
    offloaded_checkpoint(layers[0], x, offload=True).sum().backward()
    assert host.host_offload_bytes() == (0, host.HOST_OFFLOAD_FRACTION * 1000.0 * 2**20)


def test_a_bound_of_zero_offloads_nothing_and_bad_bounds_are_refused():
    host.set_host_offload_bytes(0)
    layers, x = _layers(1), torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="reached the bound"):
        offloaded_checkpoint(layers[0], x, offload=True).sum().backward()
    assert x.grad is not None and host.host_offload_bytes()[0] == 0
    for bad in (-1, "1GiB", True):
        with pytest.raises(ValueError, match="non-negative number of bytes"):
            host.set_host_offload_bytes(bad)
