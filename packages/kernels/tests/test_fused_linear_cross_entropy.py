import pytest
import torch

import swiftune_kernels
from swiftune_kernels.fused_linear_cross_entropy import (
    FusedLinearCrossEntropyFunction,
    default_chunk_size,
    fused_linear_cross_entropy,
)
from swiftune_kernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy as reference

DTYPES = [torch.float32, torch.bfloat16]
N, H, V = 37, 24, 500
CHUNK = 16  # three chunks over 37 tokens, the last one ragged


def make_inputs(dtype, device, weight_grad=False, with_bias=False, n=N, v=V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    # Logits of std ~1.5, so that softmax is neither flat nor one-hot.
    weight = (torch.randn(v, H, generator=gen) * 0.3).to(device=device, dtype=dtype).requires_grad_(weight_grad)
    bias = (torch.randn(v, generator=gen) * 0.5).to(device=device, dtype=dtype).requires_grad_(weight_grad)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    targets[::4] = -100
    return hidden, weight, targets, bias if with_bias else None


def oracle(hidden, weight, targets, bias, grad_output, **options):
    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (hidden, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_(bias.requires_grad)
    loss = reference(leaves[0], leaves[1], targets, b, **options)
    loss.backward(grad_output.double())
    return loss, leaves[0].grad, leaves[1].grad, None if b is None else b.grad


def check(got, expected, dtype, tolerance):
    loss, hidden, weight, bias = got
    e_loss, e_hidden, e_weight, e_bias = expected
    # The loss is float32 math, but from logits that the bf16 matmul rounds to bf16 (as eager transformers does):
    # the loss carries the input dtype's error, not float32's.
    torch.testing.assert_close(loss.double(), e_loss, **tolerance(dtype))
    torch.testing.assert_close(hidden.grad.double(), e_hidden, **tolerance(dtype))
    if weight.requires_grad:
        torch.testing.assert_close(weight.grad.double(), e_weight, **tolerance(dtype))
    else:
        assert weight.grad is None
    if bias is not None and bias.requires_grad:
        torch.testing.assert_close(bias.grad.double(), e_bias, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable+bias"])
def test_matches_float64_reference(dtype, trainable, device, tolerance):
    hidden, weight, targets, bias = make_inputs(dtype, device, weight_grad=trainable, with_bias=trainable)
    loss = fused_linear_cross_entropy(hidden, weight, targets, bias, chunk_size=CHUNK)
    # grad_output = the kept-token count makes the gradients O(1), so tolerance(bf16)'s atol cannot swallow them,
    # and runs the backward scaling pass.
    grad_output = (targets != -100).sum().float()
    loss.backward(grad_output)
    check((loss, hidden, weight, bias), oracle(hidden, weight, targets, bias, grad_output), dtype, tolerance)


@pytest.mark.parametrize(
    "options",
    [{"logit_scale": 0.5}, {"softcap": 2.0}, {"reduction": "sum"}, {"reduction": "none"}],
    ids=["scale", "softcap", "sum", "none"],
)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable+bias"])
def test_options(options, trainable, device, tolerance):
    hidden, weight, targets, bias = make_inputs(torch.float32, device, weight_grad=trainable, with_bias=trainable)
    loss = fused_linear_cross_entropy(hidden, weight, targets, bias, chunk_size=CHUNK, **options)
    # "none" with a trainable weight recomputes in backward with grad_output as per-token weights.
    grad_output = torch.randn(N, device=device) if options.get("reduction") == "none" else torch.tensor(1.0)
    loss.backward(grad_output)
    expected = oracle(hidden, weight, targets, bias, grad_output, **options)
    check((loss, hidden, weight, bias), expected, torch.float32, tolerance)


def test_unit_grad_output_default_chunks(device, tolerance):
    hidden, weight, targets, bias = make_inputs(torch.float32, device, weight_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    expected = oracle(hidden, weight, targets, None, torch.tensor(1.0))
    check((loss, hidden, weight, bias), expected, torch.float32, tolerance)


def test_large_vocab(device, tolerance):
    # A real vocabulary (Qwen, 151936) through the kernel's block walk, two chunks of 2 and 1 tokens.
    hidden, weight, targets, _ = make_inputs(torch.float32, device, weight_grad=True, n=3, v=151936)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=2, softcap=30.0)
    loss.backward()
    check(
        (loss, hidden, weight, None),
        oracle(hidden, weight, targets, None, torch.tensor(1.0), softcap=30.0),
        torch.float32,
        tolerance,
    )


def test_num_items_in_batch_makes_accumulation_exact(device, tolerance):
    hidden, weight, targets, _ = make_inputs(torch.float32, device, weight_grad=True)
    num_items = int((targets != -100).sum())
    full_loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=CHUNK)
    full_loss.backward()
    full_hidden_grad, full_weight_grad = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    total = 0.0
    for part in (slice(0, 20), slice(20, N)):
        h = hidden.detach()[part].clone().requires_grad_()
        loss = fused_linear_cross_entropy(h, weight, targets[part], chunk_size=CHUNK, num_items_in_batch=num_items)
        loss.backward()  # weight.grad accumulates over the two steps, as in gradient accumulation
        torch.testing.assert_close(h.grad, full_hidden_grad[part], **tolerance(torch.float32))
        total = total + loss
    torch.testing.assert_close(total, full_loss, **tolerance(torch.float32))
    torch.testing.assert_close(weight.grad, full_weight_grad, **tolerance(torch.float32))


def test_only_weight_needs_grad(device, tolerance):
    hidden, weight, targets, _ = make_inputs(torch.float32, device, weight_grad=True)
    hidden.requires_grad_(False)
    fused_linear_cross_entropy(hidden, weight, targets, chunk_size=CHUNK).backward()
    w = weight.detach().double().requires_grad_()
    reference(hidden.double(), w, targets).backward()
    torch.testing.assert_close(weight.grad.double(), w.grad, **tolerance(torch.float32))
    assert hidden.grad is None


def test_inputs_are_not_modified(device):
    hidden, weight, targets, bias = make_inputs(torch.bfloat16, device, weight_grad=True, with_bias=True)
    before = [t.detach().clone() for t in (hidden, weight, bias, targets)]
    fused_linear_cross_entropy(hidden, weight, targets, bias, chunk_size=CHUNK).backward()
    for old, new in zip(before, (hidden, weight, bias, targets), strict=True):
        assert torch.equal(old, new.detach())


def test_second_backward_is_refused(device):
    hidden, weight, targets, _ = make_inputs(torch.float32, device)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


def test_default_chunk_fits_memory_budget():
    rows = default_chunk_size(8192, 128256, 2)
    assert rows == 1024
    # The workspace beyond the returned gradients (the logits chunk) stays within 256 MiB.
    assert rows * 128256 * 2 <= 256 * 2**20
    assert default_chunk_size(8192, 256000, 2) == 512
    assert default_chunk_size(5, 128256, 2) == 5
    assert default_chunk_size(10**6, 10**9, 4) == 1


def test_cpu_without_interpreter_uses_reference(reference_only, monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton Function must not run without the interpreter")

    monkeypatch.setattr(FusedLinearCrossEntropyFunction, "apply", fail)
    hidden, weight, targets, bias = make_inputs(torch.float32, "cpu", with_bias=True)
    got = fused_linear_cross_entropy(hidden, weight, targets, bias, logit_scale=0.3)
    assert torch.equal(got, reference(hidden, weight, targets, bias, logit_scale=0.3))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"weight": torch.zeros(6, 10)}, ValueError, "weight must have shape"),
        ({"weight": torch.zeros(4, 6, dtype=torch.bfloat16)}, TypeError, "cast them to one dtype"),
        ({"bias": torch.zeros(5)}, ValueError, "bias"),
        ({"bias": torch.zeros(10, dtype=torch.float16)}, TypeError, "cast them"),
        ({"hidden": torch.zeros(4, 6, dtype=torch.int64)}, TypeError, "float32"),
        ({"hidden": torch.zeros(2, 2, 6)}, ValueError, "2-D"),
        ({"targets": torch.zeros(4)}, TypeError, "int64"),
        ({"targets": torch.zeros(3, dtype=torch.int64)}, ValueError, "shape"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"reduction": "none", "num_items_in_batch": 4}, ValueError, "num_items_in_batch"),
        ({"weight": torch.zeros(10, 6, device="meta")}, ValueError, "one device"),
    ],
)
def test_user_errors(change, error, match):
    kwargs = {"hidden": torch.zeros(4, 6), "weight": torch.zeros(10, 6), "targets": torch.zeros(4, dtype=torch.int64)}
    kwargs.update(change)
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets"), **kwargs)


def test_package_exports():
    assert swiftune_kernels.fused_linear_cross_entropy is fused_linear_cross_entropy
    assert swiftune_kernels.FusedLinearCrossEntropyFunction is FusedLinearCrossEntropyFunction


def _sharded_weight_worker(rank: int, world_size: int, store_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        # An odd vocabulary: FSDP2's Shard(0) leaves the ranks uneven shards (19 and 18 rows).
        hidden, weight, targets, bias = make_inputs(torch.float32, "cpu", weight_grad=True, with_bias=True, v=37)
        hidden = (hidden.detach() + rank).requires_grad_()  # each rank has its own batch, as in data parallelism
        sharded_weight = distribute_tensor(weight.detach(), mesh, [Shard(0)]).requires_grad_()
        sharded_bias = distribute_tensor(bias.detach(), mesh, [Shard(0)]).requires_grad_()
        loss = fused_linear_cross_entropy(hidden, sharded_weight, targets, sharded_bias, chunk_size=CHUNK)
        loss.backward()

        local_hidden = hidden.detach().clone().requires_grad_()
        expected = fused_linear_cross_entropy(local_hidden, weight, targets, bias, chunk_size=CHUNK)
        expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(hidden.grad, local_hidden.grad)
        # FSDP averages the gradients of sharded parameters over the ranks; the gathered weight must do the same.
        for param, sharded in ((weight, sharded_weight), (bias, sharded_bias)):
            mean_grad = param.grad.clone()
            dist.all_reduce(mean_grad)
            mean_grad /= world_size
            torch.testing.assert_close(sharded.grad.full_tensor(), mean_grad)
            assert sharded.grad.to_local().shape == sharded.to_local().shape
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_weight_sharded_by_fsdp_is_gathered(tmp_path):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Seen on an H100: after the GPU tests above, the forked workers die of a signal (CUDA does not survive a
        # fork); run alone, in a process that has not touched CUDA, the test passes there. CI (no GPU) always runs it.
        pytest.skip("forked workers cannot start after this process initialized CUDA; run this test on its own")
    # fork: the workers inherit this process's imports (seconds saved per worker on a small machine).
    torch.multiprocessing.start_processes(
        _sharded_weight_worker, args=(2, str(tmp_path / "store")), nprocs=2, start_method="fork"
    )
