"""launch_and_keep: the first launch goes through Triton; later ones call the compiled kernel's launcher with every
parameter in order, or the caller is told to launch through Triton again."""

import inspect

import torch
import triton
import triton.language as tl

from swiftune_kernels.compiled_launch import launch_and_keep, trailing_arguments


def _params(x_ptr, n, BLOCK, FLAG=True):  # the parameter list of a kernel, for its signature  # noqa: N803
    pass


class _FakeCompiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", grid, args))


class _FakeKernel:
    signature = inspect.signature(_params)

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **options: self.calls.append(("jit", grid, args, options)) or _FakeCompiled(self.calls)


def test_relaunch_passes_every_parameter_in_order_on_a_full_grid(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    kernel = _FakeKernel()
    relaunch = launch_and_keep(kernel, (4,), ("x", 3), {"BLOCK": 64, "num_warps": 2})
    relaunch("y", 5)
    relaunch("z", 7)
    assert kernel.calls == [
        ("jit", (4,), ("x", 3), {"BLOCK": 64, "num_warps": 2}),
        # constexprs from the options, defaults after them; launch options (num_warps) are not parameters
        ("compiled", (4, 1, 1), ("y", 5, 64, True)),
        ("compiled", (4, 1, 1), ("z", 7, 64, True)),
    ]


def test_no_relaunch_for_older_triton_or_a_parameter_without_value(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.2.0")  # its compiled kernels take only the non-constexpr values
    kernel = _FakeKernel()
    assert launch_and_keep(kernel, (4,), ("x", 3), {"BLOCK": 64}) is None
    assert len(kernel.calls) == 1  # the launch itself still happened
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert launch_and_keep(_FakeKernel(), (4,), ("x", 3), {}) is None  # BLOCK has neither a value nor a default
    assert trailing_arguments(_FakeKernel.signature, 2, {}) is None
    assert trailing_arguments(_FakeKernel.signature, 3, {}) == [True]


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


def test_a_real_kernel_launches_once_per_call(device):
    """On a GPU the kept launcher runs the kernel; under the interpreter there is none and the caller relaunches."""
    x = torch.zeros(37, device=device)
    grid = (triton.cdiv(37, 16),)
    relaunch = launch_and_keep(_add_one_kernel, grid, (x, 37), {"BLOCK": 16})
    if device.type == "cpu":
        assert relaunch is None
        _add_one_kernel[grid](x, 37, BLOCK=16)
    else:
        relaunch(x, 37)
    assert torch.equal(x, torch.full_like(x, 2.0))
