"""The cluster kernel for long rows (cross_entropy_cluster.py) against the float64 reference.

Under the interpreter (CI) its parts exchange their log-sum-exps through global memory across two launches; on an
sm_90+ GPU the same tests run the one-launch cluster exchange (distributed shared memory and mbarriers), and the
tests marked for such a GPU cover the automatic dispatch at Gemma-2 / Gemma-3 vocabularies.
"""

import importlib

import pytest
import torch

from swiftune_kernels.cluster_exchange import ClusterKernelError, cluster_launch_supported
from swiftune_kernels.cross_entropy import cross_entropy, cross_entropy_forward, use_cluster_kernel
from swiftune_kernels.cross_entropy_cluster import MAX_COLS, SPLIT, cluster_part_cols
from swiftune_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from swiftune_kernels.reference.cross_entropy import cross_entropy as reference
from swiftune_kernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy as reference_linear

ce_module = importlib.import_module("swiftune_kernels.cross_entropy")
cluster_module = importlib.import_module("swiftune_kernels.cross_entropy_cluster")

DTYPES = [torch.float32, torch.bfloat16]
OPTIONS = {
    "plain": {},
    "scale": {"logit_scale": 0.6},
    "softcap": {"softcap": 4.0},
    "scale+softcap": {"logit_scale": 1.7, "softcap": 3.0},
}
needs_clusters = pytest.mark.skipif(
    not (torch.cuda.is_available() and cluster_launch_supported(torch.device("cuda"))),
    reason="needs a GPU with thread-block clusters (sm_90+)",
)


def make_inputs(n, v, dtype, device, seed=0):
    """Logits with an ignored row, a row whose first columns are -inf and one whose maximum sits in its last part."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen) * 3
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[0] = -100
    logits[2, : v // 3] = float("-inf")  # masked vocabulary: whole parts see only -inf
    targets[2] = v - 1
    logits[4, v - 2] = 25.0
    return logits.to(device=device, dtype=dtype), targets.to(device)


def expected_loss_and_grad(logits, targets, row_weight, **options):
    x = logits.detach().double().requires_grad_()
    loss = reference(x, targets, reduction="none", **options)
    loss.backward(row_weight.double())
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("vocab", [1000, 37, 4099])
def test_matches_float64_reference(dtype, option, vocab, device, tolerance):
    # V = 1000: 16 parts of 64 columns, the last one ragged; V = 37: parts of 16, so 13 of the 16 hold no column;
    # V = 4099: parts of 272 in blocks of 512. Per-row weights, as the fused linear CE passes them.
    logits, targets = make_inputs(7, vocab, dtype, device)
    row_weight = torch.rand(7, device=device)
    grad = torch.empty_like(logits)
    options = OPTIONS[option]
    loss = cross_entropy_forward(logits, targets, row_weight, grad=grad, cluster=True, **options)
    expected_loss, expected_grad = expected_loss_and_grad(logits, targets, row_weight, **options)
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance(torch.float32))
    torch.testing.assert_close(grad.double(), expected_grad, **tolerance(dtype))
    assert loss[0] == 0 and (grad[0] == 0).all()


def test_in_place_and_loss_only(device, tolerance):
    logits, targets = make_inputs(9, 1000, torch.bfloat16, device)
    expected_loss, expected_grad = expected_loss_and_grad(logits, targets, torch.ones(9, device=device))
    loss_only = cross_entropy_forward(logits.clone(), targets, torch.ones(1, device=device), cluster=True)
    torch.testing.assert_close(loss_only.double(), expected_loss, **tolerance(torch.float32))
    buffer = logits.clone()
    loss = cross_entropy_forward(buffer, targets, torch.ones(1, device=device), grad=buffer, cluster=True)
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance(torch.float32))
    torch.testing.assert_close(buffer.double(), expected_grad, **tolerance(torch.bfloat16))


def test_out_of_range_target_gives_nan_loss_and_the_softmax_gradient(device, tolerance):
    # as the row kernel: no column is the target, so the row's gradient is its softmax and its loss NaN
    logits, targets = make_inputs(5, 300, torch.float32, device)
    targets[3] = 300
    grad = torch.empty_like(logits)
    loss = cross_entropy_forward(logits, targets, torch.ones(1, device=device), grad=grad, cluster=True)
    assert torch.isnan(loss[3]) and torch.isfinite(loss[[1, 2, 4]]).all()
    torch.testing.assert_close(grad[3], torch.softmax(logits[3].double(), 0).float(), **tolerance(torch.float32))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_public_function_with_the_cluster_kernel(reduction, inplace, device, tolerance, monkeypatch):
    monkeypatch.setitem(ce_module.CONFIG, "cluster", True)
    seen = []
    original = cluster_module.cross_entropy_cluster_forward

    def spy(*args, **kwargs):
        seen.append(kwargs["use_clusters"])
        return original(*args, **kwargs)

    monkeypatch.setattr(ce_module, "cross_entropy_cluster_forward", spy)
    logits, targets = make_inputs(11, 700, torch.bfloat16, device)
    grad_output = torch.randn(11, device=device) if reduction == "none" else torch.tensor(9.0, device=device)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x * 1 if inplace else x, targets, reduction=reduction, inplace=inplace)
    loss.backward(grad_output)
    expected_x = logits.double().requires_grad_()
    expected = reference(expected_x, targets, reduction=reduction)
    expected.backward(grad_output.double())
    assert seen == [cluster_launch_supported(device)]
    torch.testing.assert_close(loss.double(), expected.detach(), **tolerance(torch.float32))
    torch.testing.assert_close(x.grad.double(), expected_x.grad, **tolerance(torch.bfloat16))


def test_fused_linear_cross_entropy_through_the_cluster_kernel(device, tolerance, monkeypatch):
    monkeypatch.setitem(ce_module.CONFIG, "cluster", True)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(13, 16, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(300, 16, generator=gen) * 0.3).to(device).requires_grad_()
    targets = torch.randint(0, 300, (13,), generator=gen).to(device)
    targets[::4] = -100
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = reference_linear(h64, w64, targets)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), **tolerance(torch.float32))
    torch.testing.assert_close(hidden.grad.double(), h64.grad, **tolerance(torch.float32))
    torch.testing.assert_close(weight.grad.double(), w64.grad, **tolerance(torch.float32))


def test_dispatch_rule(monkeypatch):
    gpu_like = torch.empty(0, 200000, device="meta")
    # forced on or off; never past the longest row the kernel holds
    assert use_cluster_kernel(gpu_like, True) and not use_cluster_kernel(gpu_like, False)
    assert not use_cluster_kernel(torch.empty(0, MAX_COLS + 1, device="meta"), True)
    # automatic: only where clusters launch (never on the CPU, nor on a meta tensor), from the configured columns
    assert not use_cluster_kernel(gpu_like, None)
    monkeypatch.setattr(ce_module, "cluster_launch_supported", lambda device: True)
    assert use_cluster_kernel(gpu_like, None)
    assert not use_cluster_kernel(torch.empty(0, 128256, device="meta"), None)  # Llama 3: the row kernel
    assert not use_cluster_kernel(gpu_like, None, softcap=30.0)  # Gemma 2's soft-capping: the row kernel
    monkeypatch.setitem(ce_module.CONFIG, "cluster_min_cols", None)
    assert not use_cluster_kernel(gpu_like, None)


def test_automatic_choice_falls_back_to_the_row_kernel_when_clusters_do_not_compile(device, tolerance, monkeypatch):
    def broken(*args, **kwargs):
        raise ClusterKernelError("no global_smem here")

    monkeypatch.setattr(ce_module, "cross_entropy_cluster_forward", broken)
    monkeypatch.setattr(ce_module, "cluster_launch_supported", lambda device: True)
    monkeypatch.setattr(ce_module, "_CLUSTER_FAILED", [])
    monkeypatch.setitem(ce_module.CONFIG, "cluster_min_cols", 500)
    logits, targets = make_inputs(5, 700, torch.float32, device)
    row_weight = torch.rand(5, device=device)
    grad = torch.empty_like(logits)
    with pytest.warns(RuntimeWarning, match="row kernel instead"):
        loss = cross_entropy_forward(logits, targets, row_weight, grad=grad)
    expected_loss, expected_grad = expected_loss_and_grad(logits, targets, row_weight)
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance(torch.float32))
    torch.testing.assert_close(grad.double(), expected_grad, **tolerance(torch.float32))
    assert not use_cluster_kernel(logits, None)  # not tried again in this process
    with pytest.raises(ClusterKernelError):  # asked for explicitly: the error is the caller's to see
        cross_entropy_forward(logits, targets, row_weight, grad=grad, cluster=True)


def test_parts_cover_the_row_in_aligned_pieces():
    for n_cols in (37, 1000, 128256, 151936, 256000, 262144):
        part = cluster_part_cols(n_cols)
        assert part % 16 == 0 and SPLIT * part >= n_cols and (part - 16) * SPLIT < n_cols
    assert cluster_part_cols(MAX_COLS) * SPLIT == MAX_COLS


def test_too_long_rows_are_refused():
    logits = torch.zeros(1, MAX_COLS + 1)
    with pytest.raises(ValueError, match="at most"):
        cluster_module.cross_entropy_cluster_forward(
            logits, torch.zeros(1, dtype=torch.long), torch.ones(1), torch.empty(1), grad=None, ignore_index=-100,
            logit_scale=None, softcap=None, use_clusters=False,
        )  # fmt: skip


@needs_clusters
@pytest.mark.parametrize("vocab", [256000, 262144, 200003])
def test_cluster_exchange_at_long_vocabularies_on_the_gpu(vocab, tolerance):
    # the real cluster exchange, persistent clusters walking many rows (soft-capped when asked for, in place when
    # chosen automatically); 200003: ragged parts, odd row stride
    device = torch.device("cuda")
    assert use_cluster_kernel(torch.empty(0, vocab, device=device), None)
    logits, targets = make_inputs(300, vocab, torch.bfloat16, device)
    row_weight = torch.rand(300, device=device)
    grad = torch.empty_like(logits)
    loss = cross_entropy_forward(logits, targets, row_weight, grad=grad, softcap=30.0, cluster=True)
    expected_loss, expected_grad = expected_loss_and_grad(logits, targets, row_weight, softcap=30.0)
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance(torch.float32))
    torch.testing.assert_close(grad.double(), expected_grad, **tolerance(torch.bfloat16))
    loss = cross_entropy_forward(logits, targets, row_weight, grad=logits)  # in place, no softcap
    expected_loss, expected_grad = expected_loss_and_grad(make_inputs(300, vocab, torch.bfloat16, device)[0],
                                                          targets, row_weight)  # fmt: skip
    torch.testing.assert_close(loss.double(), expected_loss, **tolerance(torch.float32))
    torch.testing.assert_close(logits.double(), expected_grad, **tolerance(torch.bfloat16))
