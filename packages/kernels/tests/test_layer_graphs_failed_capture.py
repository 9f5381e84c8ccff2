"""A layer whose forward cannot be captured in a CUDA graph (layer_graphs): it stays eager and correct, random numbers
still work after the failed capture, and no further layer is captured in the process. A file of its own: pytest runs
it after test_layer_graphs.py, whose captures it would otherwise switch off."""

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from swiftune_kernels import apply_offloaded_checkpointing


def _sibling(name):
    """A test module of this folder, by path: the folder is no package and pytest imports with importlib."""
    spec = importlib.util.spec_from_file_location(f"_kernels_tests_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


graphs_tests = _sibling("test_layer_graphs")
graphs_module = importlib.import_module("swiftune_kernels.layer_graphs")
TinyLoRALayer, HIDDEN, _step, _stack, _wrappers = (
    graphs_tests.TinyLoRALayer,
    graphs_tests.HIDDEN,
    graphs_tests._step,
    graphs_tests._stack,
    graphs_tests._wrappers,
)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


class SyncingLayer(TinyLoRALayer):
    """Reads a value back to the host inside its forward, which a CUDA graph cannot capture."""

    def forward(self, x, table=None):
        if float(x.abs().amax()) < 0:
            raise AssertionError("unreachable")
        return super().forward(x, table)


@cuda
def test_a_forward_that_cannot_be_captured_stays_eager_and_correct():
    device = torch.device("cuda")
    torch.manual_seed(0)
    eager = nn.ModuleList([SyncingLayer()]).to(device)
    torch.manual_seed(0)
    graphed = nn.ModuleList([SyncingLayer()]).to(device)
    apply_offloaded_checkpointing(eager, policy="recompute")
    apply_offloaded_checkpointing(graphed, policy="recompute", cuda_graphs=True)
    x, dy = torch.randn(1, 8, HIDDEN, device=device), torch.randn(1, 8, HIDDEN, device=device)
    with pytest.warns(UserWarning, match="could not be captured"):  # the first failure in this process
        for _ in range(4):
            for w, g in zip(_step(eager, x, None, dy), _step(graphed, x, None, dy), strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    (wrapper,) = _wrappers(graphed)
    assert wrapper.graphs.captures == 0 and wrapper.graphs.replays == 0
    assert wrapper.graphs.last_error is not None


@cuda
def test_a_failed_capture_leaves_random_numbers_working():
    device = torch.device("cuda")
    torch.manual_seed(0)
    layers = nn.ModuleList([SyncingLayer()]).to(device)
    apply_offloaded_checkpointing(layers, policy="recompute", cuda_graphs=True)
    x, dy = torch.randn(1, 8, HIDDEN, device=device), torch.randn(1, 8, HIDDEN, device=device)
    for _ in range(3):
        _step(layers, x, None, dy)
    dropped = torch.nn.functional.dropout(torch.ones(1000, device=device), p=0.5)
    assert 300 < int((dropped == 0).sum()) < 700


@cuda
def test_no_layer_is_captured_after_a_failed_capture():
    device = torch.device("cuda")
    torch.manual_seed(0)
    syncing = nn.ModuleList([SyncingLayer()]).to(device)
    apply_offloaded_checkpointing(syncing, policy="recompute", cuda_graphs=True)
    x, dy = torch.randn(1, 8, HIDDEN, device=device), torch.randn(1, 8, HIDDEN, device=device)
    for _ in range(3):  # captures fail here, unless an earlier test's failure already switched them off
        _step(syncing, x, None, dy)
    assert graphs_module._CAPTURE["failed"]
    fine = _stack(1, device)
    apply_offloaded_checkpointing(fine, policy="recompute", cuda_graphs=True)
    for _ in range(4):
        _step(fine, x, None, dy)
    (wrapper,) = _wrappers(fine)
    assert wrapper.graphs.captures == 0
