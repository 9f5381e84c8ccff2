"""Fused LoRA MLP tiled over tokens (very long sequences): output and every gradient against the untiled path and the
float64 reference, on a tile that does not divide the tokens; what forward saves (no tokens x intermediate buffer);
the automatic bound; output_needed=False; a 4-bit base; bad tile sizes."""

import functools
import importlib
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from swiftune_kernels.reference import lora as reference

# the module, not the function of the same name that the package exports
mlp_module = importlib.import_module("swiftune_kernels.lora_mlp")


def _sibling(name):
    """A test module of this folder, by path: the folder is no package and pytest imports with importlib."""
    spec = importlib.util.spec_from_file_location(f"_kernels_tests_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the LoRA MLP helpers (weights dense or NF4 with random A and B, a run with fresh leaves, a random backward)
lora_tests = _sibling("test_lora")

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

TOKENS, HIDDEN, INTERMEDIATE, TILE = (2, 19), 48, 80, 8  # 38 tokens: tiles of 8, 8, 8, 8 and 6
SHAPES = {"gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}
TOKEN_COUNT = math.prod(TOKENS)
assert TOKEN_COUNT % TILE != 0 and lora_tests.RANK == 4


def _case(dtype, device, base="dense"):
    """(x, weights for our op, the same weights dense in float64 for the reference)."""
    weights = lora_tests._make_weights(SHAPES, dtype, base, device)
    weights64 = {n: (d.double(), d.double(), a.double(), b.double()) for n, (_, d, a, b) in weights.items()}
    x = torch.randn(*TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    return x, weights, weights64


def _run(x, weights, activation, grads=None, op=None, **options):
    """Our op (or ``op``) with fresh leaves and a backward: (output, [x.grad, then the six adapter gradients], dy)."""
    op = op or functools.partial(mlp_module.lora_mlp, **options)
    outs, leaves = lora_tests._ours(op, x, weights, 2.0, activation)
    if grads is None:
        grads = lora_tests._backward(outs)
    else:
        torch.autograd.backward(list(outs), grads)
    return outs[0].detach(), [leaf.grad for leaf in leaves], grads


def _assert_close_scaled(got, expected, tol):
    """The table's atol relative to the expected tensor's largest value (test_lora says why)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected.double(), atol=tol["atol"] * scale, rtol=tol["rtol"])


def _saved_shapes(fn):
    """Shapes of every tensor the autograd graph saves while ``fn`` runs its forward."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


def _act_backward_rows(monkeypatch):
    """Record the rows of every in-place activation-backward pass (one per tile of the backward)."""
    rows = []
    real = mlp_module.lora_mlp_act_backward
    monkeypatch.setattr(
        mlp_module, "lora_mlp_act_backward", lambda dh, *rest: rows.append(dh.shape[0]) or real(dh, *rest)
    )
    return rows


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_tiled_matches_untiled_and_the_float64_reference(device, tolerance, dtype, activation):
    x, weights, weights64 = _case(dtype, device)
    y_tiled, grads_tiled, dy = _run(x, weights, activation, tile_tokens=TILE)
    y_untiled, grads_untiled, _ = _run(x, weights, activation, grads=dy)
    y64, grads64, _ = _run(x.double(), weights64, activation, grads=[g.double() for g in dy], op=reference.lora_mlp)

    tol = lora_tests.EXACT if dtype == torch.float64 else tolerance(dtype)
    assert y_tiled.dtype == dtype and all(g.dtype == dtype for g in grads_tiled) and len(grads_tiled) == 7
    for got, untiled, expected in zip(
        [y_tiled, *grads_tiled], [y_untiled, *grads_untiled], [y64, *grads64], strict=True
    ):
        assert got.shape == expected.shape
        _assert_close_scaled(got, expected, tol)
        _assert_close_scaled(got, untiled, tol)


def test_tiled_without_output_gives_the_same_gradients_and_computes_nothing_in_forward(device, monkeypatch):
    """output_needed=False (a checkpointed layer's recompute) with tiling: forward runs no projection at all, y is
    NaN, and the gradients are those of the full forward, bit for bit (the tiled backward reads only x)."""
    x, weights, _ = _case(torch.float32, device)
    y, grads, dy = _run(x, weights, "silu", tile_tokens=TILE)

    projected = []
    real_project = mlp_module.project_forward
    monkeypatch.setattr(mlp_module, "project_forward", lambda *args: projected.append(args[1]) or real_project(*args))
    outs, leaves = lora_tests._ours(
        functools.partial(mlp_module.lora_mlp, tile_tokens=TILE, output_needed=False), x, weights, 2.0, "silu"
    )
    assert projected == [] and outs[0].shape == y.shape and bool(outs[0].isnan().all())
    torch.autograd.backward(list(outs), dy)
    assert len(projected) == 2 * math.ceil(TOKEN_COUNT / TILE)  # gate and up of each tile, in backward
    for full, skipped in zip(grads, leaves, strict=True):
        torch.testing.assert_close(skipped.grad, full, atol=0, rtol=0)


@pytest.mark.parametrize("output_needed", [True, False])
def test_tiling_saves_no_tokens_by_intermediate_buffer(device, monkeypatch, output_needed):
    """Untiled, forward saves gate and up (tokens x intermediate each); tiled, no saved tensor is that large, and
    backward makes its (rows x intermediate) buffers one tile at a time."""
    x, weights, _ = _case(torch.float32, device)
    big = TOKEN_COUNT * INTERMEDIATE

    def run(**options):
        op = functools.partial(mlp_module.lora_mlp, output_needed=output_needed, **options)
        return _saved_shapes(lambda: lora_tests._ours(op, x, weights, 2.0, "silu")[0])

    _, untiled_shapes = run()  # automatic: this small sequence is not tiled
    assert untiled_shapes.count((TOKEN_COUNT, INTERMEDIATE)) == 2
    outs, tiled_shapes = run(tile_tokens=TILE)
    assert tiled_shapes and (TOKEN_COUNT, HIDDEN) in tiled_shapes  # x is saved, through the same hooks
    assert all(math.prod(shape) < big for shape in tiled_shapes), tiled_shapes

    rows = _act_backward_rows(monkeypatch)
    lora_tests._backward(outs)
    assert rows == [TILE] * (TOKEN_COUNT // TILE) + [TOKEN_COUNT % TILE]


def test_automatic_tiling_engages_above_the_byte_bound(device, monkeypatch, tolerance):
    """With TILE_BYTES at 8 rows of float32 intermediate, tile_tokens=None tiles by 8 rows and gives the gradients of
    the untiled path (a tile as large as the sequence runs untiled)."""
    x, weights, _ = _case(torch.float32, device)
    monkeypatch.setattr(mlp_module, "TILE_BYTES", TILE * INTERMEDIATE * 4 + 3)
    outs, shapes = _saved_shapes(lambda: lora_tests._ours(mlp_module.lora_mlp, x, weights, 2.0, "silu"))
    assert all(math.prod(shape) < TOKEN_COUNT * INTERMEDIATE for shape in shapes), shapes
    rows = _act_backward_rows(monkeypatch)
    dy = lora_tests._backward(outs[0])
    assert rows == [TILE] * (TOKEN_COUNT // TILE) + [TOKEN_COUNT % TILE]

    rows.clear()
    y_untiled, grads_untiled, _ = _run(x, weights, "silu", grads=dy, tile_tokens=TOKEN_COUNT)
    assert rows == [TOKEN_COUNT]
    # float32 tolerance: on a GPU, matmuls over 8 rows and over all rows may sum in different orders
    torch.testing.assert_close(outs[0][0].detach(), y_untiled, **tolerance(torch.float32))
    for leaf, untiled in zip(outs[1], grads_untiled, strict=True):
        torch.testing.assert_close(leaf.grad, untiled, **tolerance(torch.float32))


def test_tiled_with_a_4bit_base_matches_the_float64_reference(device, tolerance):
    """NF4 base weights (dequantized per tile by the Triton kernel under the interpreter), bfloat16 activations."""
    x, weights, weights64 = _case(torch.bfloat16, device, base="reference")
    assert all(not isinstance(w, torch.Tensor) for w, *_ in weights.values())  # 4-bit, not dense
    y, grads, dy = _run(x, weights, "silu", tile_tokens=TILE)
    y64, grads64, _ = _run(x.double(), weights64, "silu", grads=[g.double() for g in dy], op=reference.lora_mlp)
    for got, expected in zip([y, *grads], [y64, *grads64], strict=True):
        _assert_close_scaled(got, expected, tolerance(torch.bfloat16))


def test_tiled_backward_may_run_twice(device):
    """The tiled backward consumes no saved buffer: a second backward (retain_graph) adds the same gradients."""
    x, weights, _ = _case(torch.float64, device)
    outs, leaves = lora_tests._ours(functools.partial(mlp_module.lora_mlp, tile_tokens=TILE), x, weights, 2.0, "silu")
    outs[0].sum().backward(retain_graph=True)
    first = [leaf.grad.clone() for leaf in leaves]
    outs[0].sum().backward()
    for leaf, once in zip(leaves, first, strict=True):
        torch.testing.assert_close(leaf.grad, 2 * once, **lora_tests.EXACT)


def test_tiled_under_activation_checkpointing(device):
    """Non-reentrant checkpointing recomputes the tiled forward (which saves only x): the same output and gradients,
    bit for bit on the CPU (the same ops on the same inputs)."""
    import torch.utils.checkpoint

    x, weights, _ = _case(torch.float32, device)
    tiled = functools.partial(mlp_module.lora_mlp, tile_tokens=TILE)
    y, grads, dy = _run(x, weights, "silu", op=tiled)

    def checkpointed(*args):
        return torch.utils.checkpoint.checkpoint(tiled, *args, use_reentrant=False)

    y_ckpt, grads_ckpt, _ = _run(x, weights, "silu", grads=dy, op=checkpointed)
    same = torch.equal if device.type == "cpu" else lambda a, b: torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for got, expected in zip([y_ckpt, *grads_ckpt], [y, *grads], strict=True):
        assert same(got, expected)


def test_bad_tile_tokens_raise_clear_errors():
    x, weights, _ = _case(torch.float32, "cpu")
    args = [x] + [t for w, _, a, b in weights.values() for t in (w, a, b, 2.0)]
    for bad in (0, -8):
        with pytest.raises(ValueError, match="tile_tokens must be a positive number of tokens"):
            mlp_module.lora_mlp(*args, "silu", tile_tokens=bad)
    for bad in (8.0, True, "8"):
        with pytest.raises(TypeError, match="tile_tokens must be a positive int"):
            mlp_module.lora_mlp(*args, "silu", tile_tokens=bad)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_without_grad_gives_the_saving_forwards_output(device, dtype, activation):
    """Without grad nothing is saved, so the activation overwrites gate and up goes early: the same output."""
    x, weights, _ = _case(dtype, device)
    with_grad, _, _ = _run(x, weights, activation)
    outs, _ = lora_tests._ours(mlp_module.lora_mlp, x, weights, 2.0, activation)  # leaves need grad: saves
    with torch.no_grad():
        outs_no_grad, _ = lora_tests._ours(mlp_module.lora_mlp, x, weights, 2.0, activation)
    torch.testing.assert_close(outs_no_grad[0], outs[0].detach(), atol=0, rtol=0)
    torch.testing.assert_close(outs_no_grad[0], with_grad, atol=0, rtol=0)


def test_forward_without_grad_overwrites_gate_with_the_activation(device, monkeypatch):
    """The no-grad forward asks the activation kernel to write over gate (one T x I buffer fewer)."""
    x, weights, _ = _case(torch.float32, device)
    calls = []
    real = mlp_module.gated_activation_forward

    def spy(gate, up, activation, out=None):
        calls.append(out is gate)
        return real(gate, up, activation, out=out)

    monkeypatch.setattr(mlp_module, "gated_activation_forward", spy)
    with torch.no_grad():
        lora_tests._ours(mlp_module.lora_mlp, x, weights, 2.0, "silu")
    lora_tests._ours(mlp_module.lora_mlp, x, weights, 2.0, "silu")  # with grad: h is a buffer of its own
    assert calls == [True, False]
