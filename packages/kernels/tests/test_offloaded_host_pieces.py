"""Host copies of offloaded layer inputs in power-of-two pieces: the split rule (nothing lost to the pinned
allocator's power-of-two rounding but the last piece's tail), and the copies through those pieces giving back the
exact bytes, shape and dtype without holding on to the input. CPU tests run the same piece logic unpinned."""

import gc
import importlib
import math
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from swiftune_kernels.offload_host_copy import host_piece_sizes

# The package re-exports the function under the submodule's name, so fetch the module itself.
op = importlib.import_module("swiftune_kernels.offload_host_copy")

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << math.ceil(math.log2(n))


@pytest.mark.parametrize(("largest", "smallest"), [(64, 8), (1 << 10, 1 << 4), (32, 32), (1 << 30, 1 << 20)])
def test_piece_sizes_follow_the_rule(largest, smallest):
    if largest > 1 << 16:  # the real defaults: sample around the boundaries instead of every size
        sizes = [n + d for n in (smallest, largest // 3, largest, 2 * largest + 5 * smallest) for d in (-1, 0, 1)]
    else:
        sizes = [*range(0, 4 * largest + 3 * smallest + 5), 7 * largest - 1, 7 * largest + smallest + 1]
    for nbytes in sizes:
        pieces = host_piece_sizes(nbytes, largest, smallest)
        total = sum(pieces)
        assert all(_is_power_of_two(p) and p <= largest for p in pieces), (nbytes, pieces)
        assert pieces == sorted(pieces, reverse=True), (nbytes, pieces)
        assert total >= nbytes and total - nbytes < smallest, (nbytes, pieces)
        # Only the last piece may hold unused bytes: the others are full.
        assert sum(pieces[:-1]) < nbytes or not pieces, (nbytes, pieces)
        assert len(pieces) <= math.ceil(nbytes / largest) + int(math.log2(largest // smallest)), (nbytes, pieces)
        if nbytes == 0:
            assert pieces == []
        elif nbytes <= smallest:  # small copies: one piece, the next power of two
            assert pieces == [_next_power_of_two(nbytes)]
        else:  # larger ones round up to a whole number of the smallest pieces, no more
            assert total == math.ceil(nbytes / smallest) * smallest
            assert all(p >= smallest for p in pieces)


def test_piece_sizes_of_exact_powers_of_two_and_multiples():
    largest, smallest = 1 << 12, 1 << 5
    for exponent in range(0, 13):
        assert host_piece_sizes(1 << exponent, largest, smallest) == [1 << exponent]
    for count in (2, 3, 5):
        assert host_piece_sizes(count * largest, largest, smallest) == [largest] * count


def test_piece_sizes_defaults_waste_nothing_on_the_measured_layer_inputs():
    """Llama-8B layer inputs at 327,680 and 409,600 tokens (bf16, hidden 4096): one buffer each took the next power
    of two (4 GiB); the pieces take the input's own size, a whole number of the default smallest pieces."""
    for tokens in (327_680, 409_600):
        nbytes = tokens * 4096 * 2
        assert nbytes % op.HOST_PIECE_MIN_BYTES == 0  # so the rule leaves nothing over
        pieces = host_piece_sizes(nbytes)
        assert sum(pieces) == nbytes < _next_power_of_two(nbytes)
        assert max(pieces) <= op.HOST_PIECE_MAX_BYTES
    # The usual training input (2 x 2048 tokens): one piece, as one buffer was.
    assert host_piece_sizes(2 * 2048 * 4096 * 2) == [2 * 2048 * 4096 * 2]


def test_piece_sizes_errors():
    with pytest.raises(ValueError, match="largest must be a power of two"):
        host_piece_sizes(100, 48, 8)
    with pytest.raises(ValueError, match="smallest must be a power of two"):
        host_piece_sizes(100, 64, 0)
    with pytest.raises(ValueError, match="must not exceed largest"):
        host_piece_sizes(100, 8, 64)
    with pytest.raises(ValueError, match="nbytes"):
        host_piece_sizes(-1)


# --- copies through the pieces ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_pieces(monkeypatch):
    """Pieces of 8..64 bytes, so that tensors of a few hundred bytes span several, the last one rounded up."""
    monkeypatch.setattr(op, "HOST_PIECE_MAX_BYTES", 64)
    monkeypatch.setattr(op, "HOST_PIECE_MIN_BYTES", 8)
    return 64, 8


class _CountCopies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.copies += 1
        return func(*args, **(kwargs or {}))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8).clone()


def _inputs():
    """Odd sizes, a transposed (non-contiguous) and a sliced input, and bit patterns that == would not compare."""
    special = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45], dtype=torch.float32)
    transposed = torch.randn(7, 9, dtype=torch.float64).t()
    sliced = torch.randn(5, 11, 6, dtype=torch.bfloat16)[:, 1:10:2]
    return {
        "fp16-odd": torch.randn(3, 5, 7, dtype=torch.float16),
        "fp64-transposed": transposed,
        "bf16-sliced": sliced,
        "fp32-special": torch.cat([special, torch.randn(33)]).reshape(37),
        "uint8-13": torch.arange(13, dtype=torch.uint8),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(2, 0, 3),
    }


@pytest.mark.parametrize("name", list(_inputs()))
def test_round_trip_through_several_pieces_is_bit_exact(tiny_pieces, name):
    largest, smallest = tiny_pieces
    torch.manual_seed(0)
    x = _inputs()[name]
    nbytes = x.numel() * x.element_size()
    expected_sizes = host_piece_sizes(nbytes, largest, smallest)
    want = _bytes(x)
    shape, dtype = x.shape, x.dtype
    counter = _CountCopies()
    with counter:
        copy = op.HostCopy(x)
    if x.is_contiguous():  # one copy per piece; a non-contiguous input is first made contiguous (one more)
        assert counter.copies == len(expected_sizes)
    assert [p.numel() for p in copy.host] == expected_sizes
    assert copy.host_bytes == sum(expected_sizes)
    assert all(p.dtype == torch.uint8 and not p.is_pinned() for p in copy.host)
    if name == "fp16-odd":  # the case this is about: several pieces, the last one holding padding
        assert len(expected_sizes) > 2 and sum(expected_sizes) > nbytes

    # The copy owns its bytes: later writes to the input do not reach it, and the input's storage dies with it.
    x.zero_()
    storage = weakref.ref(x.untyped_storage())
    del x
    gc.collect()
    assert storage() is None

    got = copy.fetch()
    assert got.shape == shape and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(_bytes(got), want)
    assert copy.host is None and copy.host_bytes == 0  # the pieces are released once fetched


def test_an_input_that_fits_one_piece_is_one_copy():
    """The common case (an input below the largest piece and a power of two, e.g. 32 MiB at the defaults) keeps a
    single copy each way: no extra launches."""
    x = torch.randn(4, 16, 16)  # 4 KiB: a power of two below the default smallest piece
    counter = _CountCopies()
    with counter:
        copy = op.HostCopy(x)
    assert counter.copies == 1 and len(copy.host) == 1 and copy.host_bytes == x.numel() * x.element_size()
    with counter:
        got = copy.fetch()
    assert counter.copies == 2 and torch.equal(got, x)


def test_offloaded_checkpoint_gradients_through_pieces_match(tiny_pieces, monkeypatch, stack_grads):
    """A stack of layers whose offloaded inputs each span several pieces gives the gradients of no checkpointing,
    exactly (the CPU recompute runs the same kernels)."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Sequential(nn.Linear(13, 13), nn.Tanh()) for _ in range(3)).double()
    x = torch.randn(3, 7, 13, dtype=torch.float64)
    assert len(host_piece_sizes(x.numel() * 8, *tiny_pieces)) > 2
    dy = torch.randn_like(x)

    seen = []
    original = op.HostCopy.__init__

    def recording_init(self, tensor, *args, **kwargs):
        original(self, tensor, *args, **kwargs)
        seen.append(len(self.host))

    monkeypatch.setattr(op.HostCopy, "__init__", recording_init)
    got = stack_grads(layers, x, dy, True)
    want = stack_grads(layers, x, dy, False)
    assert len(seen) == 3 and all(n > 2 for n in seen)  # every layer input went through several pieces
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0.0, rtol=0.0)


@cuda_only
def test_cuda_pieces_are_pinned_and_round_trip(tiny_pieces):
    largest, smallest = tiny_pieces
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16, device="cuda")
    want = _bytes(x)
    copy = op.HostCopy(x)
    assert copy.host.is_pinned() and len(copy.host) == len(host_piece_sizes(x.numel() * 2, largest, smallest))
    del x
    got = copy.fetch()
    assert got.device.type == "cuda" and got.shape == (3, 5, 7) and torch.equal(_bytes(got), want)
