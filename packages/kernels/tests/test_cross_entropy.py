import importlib

import pytest
import torch

import swiftune_kernels
from swiftune_kernels.cross_entropy import CrossEntropyFunction, cross_entropy, cross_entropy_forward
from swiftune_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from swiftune_kernels.reference.cross_entropy import cross_entropy as reference
from swiftune_kernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy as reference_linear

# the module, not the function of the same name that the package exports
ce_module = importlib.import_module("swiftune_kernels.cross_entropy")
reduce_module = importlib.import_module("swiftune_kernels.cross_entropy_reduce")

DTYPES = [torch.float32, torch.bfloat16]
OPTIONS = {
    "plain": {},
    "scale": {"logit_scale": 0.6},
    "softcap": {"softcap": 4.0},
    "scale+softcap": {"logit_scale": 1.7, "softcap": 3.0},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
}


def make_inputs(n, v, dtype, device, ignore_every=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * 3).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    targets[::ignore_every] = -100
    return logits, targets


def oracle(logits, targets, grad_output=None, **options):
    x = logits.detach().double().requires_grad_()
    loss = reference(x, targets, **options)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.double())
    return loss, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", OPTIONS)
def test_matches_float64_reference(dtype, option, device, tolerance):
    # Odd shapes; the interpreter runs ~1000 rows a second, so the option variants use fewer rows.
    n = 37 if option == "plain" else 13
    logits, targets = make_inputs(n, 1000, dtype, device)
    options = OPTIONS[option]
    logits.requires_grad_()
    loss = cross_entropy(logits, targets, **options)
    # Per-row grad_output for "none"; otherwise the count of kept rows, which also makes the bf16 gradient O(1)
    # so that tolerance(bf16)'s atol does not swallow it, and runs the backward scaling pass.
    n_kept = float((targets != -100).sum())
    grad_output = torch.randn(n, device=device) if option == "none" else torch.tensor(n_kept, device=device)
    loss.backward(grad_output)
    expected_loss, expected_grad = oracle(logits, targets, grad_output, **options)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance(torch.float32))
    torch.testing.assert_close(logits.grad.double(), expected_grad, **tolerance(dtype))
    assert logits.grad.dtype == dtype
    assert (logits.grad[targets == -100] == 0).all()


def test_unit_grad_output_skips_scaling_and_stays_exact(device, tolerance):
    logits, targets = make_inputs(37, 1000, torch.float32, device)
    logits.requires_grad_()
    cross_entropy(logits, targets).backward()
    expected_loss, expected_grad = oracle(logits, targets)
    torch.testing.assert_close(logits.grad.double(), expected_grad, **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_vocab_walks_blocks(dtype, device, tolerance):
    # 151936 (Qwen) spans 5 blocks of 32768 bf16 (10 of 16384 fp32) with a ragged last block.
    logits, targets = make_inputs(3, 151936, dtype, device, ignore_every=3)
    logits[1, 151935] = 30.0  # the maximum sits in the ragged last block
    targets[1] = 151935
    logits.requires_grad_()
    loss = cross_entropy(logits, targets, softcap=30.0)
    loss.backward(torch.tensor(2.0, device=device))
    expected_loss, expected_grad = oracle(logits, targets, torch.tensor(2.0), softcap=30.0)
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance(torch.float32))
    torch.testing.assert_close(logits.grad.double(), expected_grad, **tolerance(dtype))


def test_small_blocks_online_max(device, tolerance):
    # Many 128-wide blocks with the row maximum late, so the running max and sum are rescaled several times.
    logits, targets = make_inputs(5, 1000, torch.float32, device)
    logits[:, 900] = 25.0
    grad = torch.empty_like(logits)
    weight = torch.full((1,), 0.5, device=device)
    loss = cross_entropy_forward(logits, targets, weight, grad=grad, block_v=128)
    expected_loss, expected_grad = oracle(logits, targets, reduction="none")
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance(torch.float32))
    torch.testing.assert_close(grad.double(), 0.5 * expected_grad, **tolerance(torch.float32))


def test_all_rows_ignored_gives_nan_mean_and_zero_grad(device):
    logits, targets = make_inputs(4, 100, torch.float32, device)
    targets[:] = -100
    logits.requires_grad_()
    loss = cross_entropy(logits, targets)
    loss.backward()
    assert torch.isnan(loss)
    assert (logits.grad == 0).all()
    assert cross_entropy(logits, targets, reduction="sum") == 0


def test_custom_ignore_index(device, tolerance):
    logits, _ = make_inputs(11, 50, torch.float32, device)
    targets = torch.arange(11, device=device) * 4
    targets[::3] = 7  # a real class index used as ignore_index
    logits.requires_grad_()
    cross_entropy(logits, targets, ignore_index=7).backward()
    _, expected_grad = oracle(logits, targets, ignore_index=7)
    torch.testing.assert_close(logits.grad.double(), expected_grad, **tolerance(torch.float32))
    assert (logits.grad[targets == 7] == 0).all()


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_makes_accumulation_exact(as_tensor, device, tolerance):
    logits, targets = make_inputs(21, 300, torch.float32, device)
    total = int((targets != -100).sum())
    num_items = torch.tensor(total) if as_tensor else total  # transformers may pass it as a CPU tensor
    full = logits.clone().requires_grad_()
    full_loss = cross_entropy(full, targets)
    full_loss.backward()
    halves = [logits[:10].clone().requires_grad_(), logits[10:].clone().requires_grad_()]
    parts = zip(halves, (targets[:10], targets[10:]), strict=True)
    losses = [cross_entropy(h, t, num_items_in_batch=num_items) for h, t in parts]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0] + losses[1], full_loss, **tolerance(torch.float32))
    torch.testing.assert_close(torch.cat([h.grad for h in halves]), full.grad, **tolerance(torch.float32))
    # Without it each half is a mean of its own: the sum of halves is about twice the full-batch loss.
    assert cross_entropy(halves[0], targets[:10]) + cross_entropy(halves[1], targets[10:]) > 1.5 * full_loss


def test_inplace_writes_gradient_into_logits_and_matches(device):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(13, 16, generator=gen).to(device).requires_grad_()
    lm_head = torch.randn(16, 200, generator=gen).to(device).requires_grad_()
    targets = torch.randint(0, 200, (13,), generator=gen).to(device)
    grads = []
    for inplace in (False, True):
        hidden.grad = lm_head.grad = None
        logits = hidden @ lm_head  # mm saves its inputs, not its output: in-place is safe
        before = logits.detach().clone()
        loss = cross_entropy(logits, targets, inplace=inplace)
        loss.backward(torch.tensor(3.0))
        grads.append((loss, hidden.grad, lm_head.grad))
        if inplace:
            assert not torch.equal(logits.detach(), before)  # the buffer now holds the logits gradient
        else:
            assert torch.equal(logits.detach(), before)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inplace_refuses_logits_that_autograd_saved(device):
    x = torch.randn(6, 40, device=device).requires_grad_()
    logits = x.exp()  # exp's backward reads its output: overwriting it must not go unnoticed
    loss = cross_entropy(logits, torch.randint(0, 40, (6,), device=device), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_without_grad_leaves_logits_alone(device):
    logits, targets = make_inputs(7, 90, torch.bfloat16, device)
    before = logits.clone()
    cross_entropy(logits, targets, inplace=True)
    assert torch.equal(logits, before)


def test_inplace_refuses_leaf(device):
    logits, targets = make_inputs(3, 20, torch.float32, device)
    with pytest.raises(ValueError, match="leaf"):
        cross_entropy(logits.requires_grad_(), targets, inplace=True)


def test_second_backward_is_refused(device):
    logits, targets = make_inputs(3, 20, torch.float32, device)
    loss = cross_entropy(logits.requires_grad_(), targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


def test_non_contiguous_logits(device, tolerance):
    logits, targets = make_inputs(9, 70, torch.float32, device)
    base = logits.t().contiguous().requires_grad_()
    view = base.t()  # vocab stride 9: the kernel works on a private copy, which may take the gradient
    cross_entropy(view, targets, inplace=True).backward()
    _, expected_grad = oracle(logits, targets)
    torch.testing.assert_close(base.grad.t().double(), expected_grad, **tolerance(torch.float32))
    assert torch.equal(base.detach(), logits.t())


def test_out_of_range_target_gives_nan(device):
    logits, targets = make_inputs(3, 20, torch.float32, device)
    targets[1] = 20
    loss = cross_entropy(logits, targets, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])


def test_cpu_without_interpreter_uses_reference(reference_only, monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton Function must not run without the interpreter")

    monkeypatch.setattr(CrossEntropyFunction, "apply", fail)
    logits, targets = make_inputs(8, 30, torch.bfloat16, "cpu")
    got = cross_entropy(logits, targets, softcap=5.0, num_items_in_batch=20)
    assert torch.equal(got, reference(logits, targets, softcap=5.0, num_items_in_batch=20))
    assert got.dtype == torch.float32


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"targets": torch.zeros(4, dtype=torch.int32)}, TypeError, "int64"),
        ({"targets": torch.zeros(4, 1, dtype=torch.int64)}, ValueError, "shape"),
        ({"targets": torch.zeros(5, dtype=torch.int64)}, ValueError, "shape"),
        ({"logits": torch.zeros(4, 10, dtype=torch.int64)}, TypeError, "float32"),
        ({"logits": torch.zeros(2, 2, 10)}, ValueError, "2-D"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"reduction": "sum", "num_items_in_batch": 3}, ValueError, "num_items_in_batch"),
        ({"num_items_in_batch": 0}, ValueError, "positive"),
        ({"num_items_in_batch": torch.ones(2)}, ValueError, "0-d"),
        ({"softcap": 0.0}, ValueError, "softcap"),
        ({"targets": torch.zeros(4, dtype=torch.int64, device="meta")}, ValueError, "one device"),
    ],
)
def test_user_errors(change, error, match):
    kwargs = {"logits": torch.zeros(4, 10), "targets": torch.zeros(4, dtype=torch.int64), **change}
    with pytest.raises(error, match=match):
        cross_entropy(kwargs.pop("logits"), kwargs.pop("targets"), **kwargs)


def test_package_exports():
    assert swiftune_kernels.cross_entropy is cross_entropy
    assert swiftune_kernels.CrossEntropyFunction is CrossEntropyFunction


# --- launch variants of the row kernel (CONFIG): lane widths, persistent grids, no gradient prefetch ------------------

VARIANT_OPTIONS = {"plain": {}, "scale+softcap": {"logit_scale": 1.7, "softcap": 3.0}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", VARIANT_OPTIONS)
@pytest.mark.parametrize(
    ("block_v", "lane_cols", "programs", "grad_prefetch"),
    [
        (512, 64, None, True),
        (256, 32, 3, False),
        (128, 128, None, True),
        (1024, None, None, True),
        (2048, 128, 2, True),
    ],
)
def test_lanes_and_persistent_grid_match_float64_reference(
    dtype, option, block_v, lane_cols, programs, grad_prefetch, device, tolerance
):
    # V = 1000: blocks of 512 in lanes of 64 (8 lanes, the second block ragged), of 256 in lanes of 32 walked by 3
    # persistent programs without the gradient pass's prefetch, one lane a block (128), the default (one lane a
    # block) with blocks of 1024, and a block of 2048 whose lanes past column 1000 see no column at all. Per-row
    # weights as the fused linear CE passes them; a row whose first 300 columns are -inf (masked vocabulary: its
    # first lanes see only -inf for a while) with its maximum in the last block, another whose maximum sits early,
    # so lanes are rescaled and combined both ways.
    logits, targets = make_inputs(7, 1000, dtype, device)
    logits[2, :300] = float("-inf")
    logits[2, 990] = 20.0
    targets[2] = 990
    logits[4, 100] = 25.0
    row_weight = torch.rand(7, device=device)
    grad = torch.empty_like(logits)
    options = VARIANT_OPTIONS[option]
    loss = cross_entropy_forward(
        logits,
        targets,
        row_weight,
        grad=grad,
        block_v=block_v,
        lane_cols=lane_cols,
        programs=programs,
        grad_prefetch=grad_prefetch,
        **options,
    )
    x = logits.detach().double().requires_grad_()
    expected = reference(x, targets, reduction="none", **options)
    expected.backward(row_weight.double())
    torch.testing.assert_close(loss.double(), expected.detach(), **tolerance(torch.float32))
    torch.testing.assert_close(grad.double(), x.grad, **tolerance(dtype))
    assert (grad[targets == -100] == 0).all() and (loss[targets == -100] == 0).all()


@pytest.mark.parametrize(
    "config",
    [
        {"lane_cols": 16, "block_v": 128},
        {"programs_per_sm": 1, "num_warps": 2},
        {"grad_prefetch": False, "block_v": 256},
    ],
)
def test_config_variants_through_the_public_function(config, device, tolerance, monkeypatch):
    """A sweep winner switched on in CONFIG: loss and gradient, out of place and in place."""
    for key, value in config.items():
        monkeypatch.setitem(ce_module.CONFIG, key, value)
    logits, targets = make_inputs(9, 700, torch.bfloat16, device)
    n_kept = (targets != -100).sum().float()
    expected_loss, expected_grad = oracle(logits, targets, n_kept)
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x * 1 if inplace else x, targets, inplace=inplace)
        loss.backward(n_kept)  # makes the bf16 gradient O(1) and runs the scaling pass
        torch.testing.assert_close(loss.double(), expected_loss, **tolerance(torch.float32))
        torch.testing.assert_close(x.grad.double(), expected_grad, **tolerance(torch.bfloat16))


def test_fused_mean_launches_match_the_torch_reduction(device, monkeypatch):
    logits, targets = make_inputs(11, 150, torch.float32, device)
    results = []
    for fused_mean in (False, True):
        monkeypatch.setitem(ce_module.CONFIG, "fused_mean", fused_mean)
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, targets)
        loss.backward()
        results.append((loss, x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)  # only the summation order differs
    assert torch.equal(results[1][1], results[0][1])  # the same weight 1 / count: the same gradient bits
    # every row ignored: 0 / 0 = NaN and a zero gradient, as the torch reduction and the reference give
    targets[:] = -100
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, targets)
    loss.backward()
    assert torch.isnan(loss) and (x.grad == 0).all()


def test_fused_linear_cross_entropy_follows_the_config(device, tolerance, monkeypatch):
    """The fused linear CE calls cross_entropy_forward per chunk of tokens: a CONFIG variant applies there too."""
    monkeypatch.setitem(ce_module.CONFIG, "lane_cols", 16)
    monkeypatch.setitem(ce_module.CONFIG, "block_v", 64)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(13, 16, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(300, 16, generator=gen) * 0.3).to(device).requires_grad_()
    targets = torch.randint(0, 300, (13,), generator=gen).to(device)
    targets[::4] = -100
    seen = []
    original = ce_module._cross_entropy_fwd_kernel
    monkeypatch.setattr(ce_module, "_cross_entropy_fwd_kernel", _Spy(original, seen))
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    loss.backward()
    assert seen and all(kwargs["LANE_COLS"] == 16 and kwargs["BLOCK_V"] == 64 for _, kwargs in seen)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = reference_linear(h64, w64, targets)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), **tolerance(torch.float32))
    torch.testing.assert_close(hidden.grad.double(), h64.grad, **tolerance(torch.float32))
    torch.testing.assert_close(weight.grad.double(), w64.grad, **tolerance(torch.float32))


class _Spy:
    """Records the (args, kwargs) of each launch of a Triton kernel, then launches it."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_backward_scaling_loops_when_programs_are_capped(device, monkeypatch):
    """A scalar grad_output scales the whole gradient with at most _BWD_MAX_PROGRAMS programs, each walking spans."""
    monkeypatch.setattr(reduce_module, "_BWD_MAX_PROGRAMS", 2)
    grad = torch.randn(5, 70000, device=device)  # 350000 elements: 6 spans of 65536 for 2 programs
    expected = grad * 3.0
    ce_module.cross_entropy_backward(grad, torch.tensor([3.0], device=device))
    assert torch.equal(grad, expected)
