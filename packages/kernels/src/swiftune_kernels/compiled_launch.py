"""Relaunching one compiled Triton kernel without Triton's per-call dispatch, for launches made thousands of times.

``kernel[grid](*args)`` binds the arguments, computes their specialization (dtypes, 16-byte alignment, integers equal
to 1 or divisible by 16), looks the compiled binary up and then launches it: ~30 us of Python on an H100 host, where
the launch itself takes a few. A QLoRA step dequantizes each 4-bit weight 2-3 times (~640 launches at Llama-8B) and
is bound by the CPU at small batches, so that dispatch is time the GPU waits.

:func:`launch_and_keep` launches once through Triton and returns a function that launches the same binary again.
The caller must guarantee that the new arguments have the specialization of the first ones: the NF4 weights' plans
change only the output pointer between launches, and key the kept launcher by that pointer's 16-byte alignment.
Under the interpreter (and for Triton older than 3.3, whose compiled kernels take another argument layout) there is
nothing to keep: it returns None and callers launch through Triton every time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import triton

# Triton 3.3 and later pass every parameter, constexprs included, to a compiled kernel's launcher, in order.
_MIN_TRITON = (3, 3)


def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor)."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def trailing_arguments(signature: inspect.Signature, n_positional: int, options: dict) -> list | None:
    """Values of the parameters after the first ``n_positional``, in order: from ``options`` or their defaults.

    None when one of them has neither (the kernel could not have been launched that way).
    """
    values = []
    for parameter in list(signature.parameters.values())[n_positional:]:
        if parameter.name in options:
            values.append(options[parameter.name])
        elif parameter.default is not inspect.Parameter.empty:
            values.append(parameter.default)
        else:
            return None
    return values


def launch_and_keep(kernel, grid: Sequence[int], args: Sequence, options: dict) -> Callable | None:
    """Launch ``kernel[grid](*args, **options)``; return ``relaunch(*args)`` for later launches, or None.

    Args:
        kernel: a ``@triton.jit`` function (not an autotuner).
        grid: the launch grid, a tuple of ints, the same for every relaunch.
        args: the first parameters' values, positional.
        options: the remaining parameters' values (constexprs) and launch options (``num_warps``, ...), by name.

    Returns:
        ``relaunch(*new_args)``, which launches the compiled binary on ``new_args`` (the same number of positional
        arguments, with the same specialization as ``args``) on the current CUDA stream; None where the compiled
        kernel cannot be relaunched directly (interpreter, Triton < 3.3, an unexpected kernel object).
    """
    compiled = kernel[tuple(grid)](*args, **options)
    signature = getattr(kernel, "signature", None)
    if compiled is None or not isinstance(signature, inspect.Signature) or triton_version() < _MIN_TRITON:
        return None
    if not hasattr(type(compiled), "__getitem__"):
        return None
    tail = trailing_arguments(signature, len(args), options)
    if tail is None:
        return None
    runner = compiled[(*grid, 1, 1)[:3]]  # a compiled kernel's launcher reads all three grid dimensions

    def relaunch(*new_args) -> None:
        runner(*new_args, *tail)

    return relaunch
