"""Shared test settings for the kernels: the one tolerance table, and the interpreter switch.

Triton chooses between compiling and interpreting a kernel when the kernel is decorated, that is when
its module is imported; so without a GPU the interpreter is switched on here, before any test module
imports an op.
"""

import os

import pytest
import torch

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
