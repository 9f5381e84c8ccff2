"""Shared test settings for the kernels: the one tolerance table, and the interpreter switch.

Triton chooses between compiling and interpreting a kernel when the kernel is decorated, that is when
its module is imported; so without a GPU the interpreter is switched on here, before any test module
imports an op.
"""

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Kernel output (computed in float32, stored in the input dtype) against the float64 reference.
# bfloat16 keeps 8 bits of mantissa: one rounding of the output is ~4e-3 relative.
TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture
def tolerance():
    """Return a function dtype -> dict(atol=..., rtol=...) for torch.testing.assert_close."""
    return lambda dtype: TOLERANCES[dtype]


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA where there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def reference_only(monkeypatch):
    """Switch the interpreter off so that ops on CPU tensors take the pure-torch reference path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield


def _stack_grads(layers, x, dy, checkpointed):
    from swiftune_kernels import offloaded_checkpoint

    for p in layers.parameters():
        p.grad = None
    h = x.clone().requires_grad_()
    y = h
    for layer in layers:
        y = offloaded_checkpoint(layer, y, offload=True) if checkpointed else layer(y)
    y.backward(dy)
    return [h.grad, *(p.grad for p in layers.parameters())]


@pytest.fixture
def stack_grads():
    """``grads(layers, x, dy, checkpointed)``: the gradients of x and of every parameter of ``layers`` run one after
    the other on x, each through offloaded_checkpoint(offload=True) when ``checkpointed``, else plainly."""
    return _stack_grads


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "breaks_capture: the test makes a CUDA-graph capture fail, which switches captures off for the rest "
        "of the process (layer_graphs); such tests run after all others.",
    )


def pytest_collection_modifyitems(config, items):
    """Run the tests that switch CUDA-graph captures off for the process last, so that tests in other files which
    need captures (the layer graphs with slot parking) prove them whatever order the files are given in."""
    items.sort(key=lambda item: item.get_closest_marker("breaks_capture") is not None)


class TinyLoRAMLPLayer(nn.Module):
    """A pre-norm residual block around lora_mlp, the way the patched Llama layer calls it: the recompute skips the
    down projection (``output_needed=False``). Frozen base weights, six trainable adapters."""

    def __init__(self, hidden: int, inter: int, rank: int):
        super().__init__()
        self.gate_w, self.up_w = (nn.Parameter(torch.randn(inter, hidden) / 4, requires_grad=False) for _ in "gu")
        self.down_w = nn.Parameter(torch.randn(hidden, inter) / 6, requires_grad=False)
        self.adapters = nn.ParameterList(
            nn.Parameter(torch.randn(shape) / 3)
            for shape in [(rank, hidden), (inter, rank), (rank, hidden), (inter, rank), (rank, inter), (hidden, rank)]
        )

    def forward(self, x):
        from swiftune_kernels import lora_mlp, recomputing_for_backward

        ga, gb, ua, ub, da, db = self.adapters
        y = lora_mlp(
            torch.tanh(x), self.gate_w, ga, gb, 0.5, self.up_w, ua, ub, 0.5, self.down_w, da, db, 0.5,
            output_needed=not recomputing_for_backward(),
        )  # fmt: skip
        return x + y


@pytest.fixture
def fresh_host_budget():
    """The host offload budget (offload_host_copy) with no copies counted and its bound not yet measured, before and
    after the test: what the offloading and parking tests count against."""
    import importlib

    budget = importlib.import_module("swiftune_kernels.offload_host_copy")._HOST_BUDGET
    budget.update(pinned=0, bound=None, warned=False, shared=0)
    yield budget
    budget.update(pinned=0, bound=None, warned=False, shared=0)


@pytest.fixture
def lora_mlp_stack():
    """``stack(n, device, hidden, inter, rank)``: n seeded :class:`TinyLoRAMLPLayer` layers in a ModuleList."""

    def stack(n, device, hidden, inter, rank):
        torch.manual_seed(0)
        return nn.ModuleList(TinyLoRAMLPLayer(hidden, inter, rank) for _ in range(n)).to(device)

    return stack


@pytest.fixture
def base_matmuls(monkeypatch):
    """The weights' shapes of the base projections computed inside lora_mlp (its project_forward calls)."""
    import importlib

    mlp_module = importlib.import_module("swiftune_kernels.lora_mlp")
    calls = []
    original = mlp_module.project_forward

    def counting(x2, weight, *args, **kwargs):
        calls.append(weight.shape)
        return original(x2, weight, *args, **kwargs)

    monkeypatch.setattr(mlp_module, "project_forward", counting)
    return calls
