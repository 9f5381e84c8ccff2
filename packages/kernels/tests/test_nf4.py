"""NF4 dequantization: the Triton path (the interpreter on CPU) is bit-identical to bitsandbytes and the reference."""

import pytest
import torch

from swiftune_kernels import nf4 as nf4_module
from swiftune_kernels.nf4 import dequantize_nf4, dequantize_nf4_forward
from swiftune_kernels.reference import nf4 as reference

ODD_SHAPES = [(37, 123), (1, 5), (300, 17)]
# (compress_statistics, blocksize)
QUANT_SETTINGS = [(False, 64), (True, 64), (False, 128), (True, 128)]


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_equals_bitsandbytes_dequantize_4bit(device, dtype, shape):
    bnb_f = _bnb()
    torch.manual_seed(0)
    weight = torch.randn(shape, device=device, dtype=dtype)
    for compress, blocksize in QUANT_SETTINGS:
        packed, state = bnb_f.quantize_4bit(weight, quant_type="nf4", compress_statistics=compress, blocksize=blocksize)
        expected = bnb_f.dequantize_4bit(packed, state)
        out = dequantize_nf4(packed, state)
        assert out.dtype == dtype and out.shape == weight.shape
        # bitsandbytes rounds the float32 product code * absmax once to the output dtype, as we do: exact equality
        assert torch.equal(out, expected), (compress, blocksize)
        assert torch.equal(reference.dequantize_nf4(packed, state), expected), (compress, blocksize)


def test_equals_bitsandbytes_on_a_llm_like_layout(device):
    """Rows that are whole multiples of the block size (every real weight), plus fp4 through its code table.

    (bitsandbytes' compiled CPU kernel, used for even row lengths, misplaces the scales when a row is shorter than a
    block, e.g. 64x64 with blocksize 128, disagreeing with its own pure-torch and CUDA backends; such rows are
    avoided here. The odd shapes above take its pure-torch path.)
    """
    bnb_f = _bnb()
    torch.manual_seed(1)
    weight = torch.randn(48, 256, device=device, dtype=torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        packed, state = bnb_f.quantize_4bit(weight, quant_type=quant_type, compress_statistics=True, blocksize=64)
        assert torch.equal(dequantize_nf4(packed, state), bnb_f.dequantize_4bit(packed, state))
        # float32 output: the unrounded product, which rounds to bitsandbytes' bf16 bits
        wide = dequantize_nf4(packed, state, torch.float32)
        assert wide.dtype == torch.float32 and torch.equal(wide.bfloat16(), bnb_f.dequantize_4bit(packed, state))


def test_hand_packed_nibbles_high_first(device):
    """Indices and scales written by hand, no quantizer involved: element 2j is the high nibble of byte j."""
    index = torch.tensor([15, 0, 7, 3, 12, 1, 9], dtype=torch.uint8)  # 7 elements: the last low nibble is padding
    padded = torch.cat([index, torch.tensor([5], dtype=torch.uint8)])
    packed = ((padded[0::2] << 4) | padded[1::2]).unsqueeze(1).to(device)
    code = torch.tensor(reference.NF4_CODE, dtype=torch.float32, device=device)
    absmax = torch.tensor([2.0, 0.5], device=device)  # blocksize 4: elements 0-3, then 4-6
    state = reference.QuantState(absmax=absmax, shape=torch.Size([7]), code=code, blocksize=4, dtype=torch.float32)
    expected = code[index.long().to(device)] * absmax.repeat_interleave(4)[:7]
    assert torch.equal(dequantize_nf4(packed, state), expected)
    assert dequantize_nf4(packed, state)[0].item() == 2.0 and dequantize_nf4(packed, state)[1].item() == -2.0

    # double quantization by hand: absmax[b] = code2[q[b]] * absmax2[b // 2] + offset (blocksize2 = 2)
    code2 = torch.linspace(-1, 1, 256, device=device)
    state2 = reference.QuantState(absmax=torch.tensor([3.0], device=device), code=code2, blocksize=2)
    qabsmax = torch.tensor([200, 17], dtype=torch.uint8, device=device)
    nested = reference.QuantState(
        absmax=qabsmax, shape=torch.Size([7]), code=code, blocksize=4, dtype=torch.float32,
        offset=torch.tensor(0.25, device=device), state2=state2,
    )  # fmt: skip
    scales = code2[qabsmax.long()] * 3.0 + 0.25
    assert torch.equal(dequantize_nf4(packed, nested), code[index.long().to(device)] * scales.repeat_interleave(4)[:7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("compress", [False, True])
def test_equals_reference_without_bitsandbytes(device, dtype, compress):
    torch.manual_seed(2)
    for shape, blocksize in [((37, 123), 64), ((3, 300, 17), 128), ((1, 5), 64), ((40, 260), 32)]:
        weight = torch.randn(shape, device=device, dtype=dtype)
        # nested_blocksize 4 gives several second-level blocks even on these small weights
        packed, state = reference.quantize_nf4(weight, blocksize, compress, nested_blocksize=4)
        out = dequantize_nf4(packed, state)
        assert out.dtype == dtype and out.shape == weight.shape
        assert torch.equal(out, reference.dequantize_nf4(packed, state))
        # and the quantization round trip is within half the widest NF4 gap (0.16) times the block scale
        assert (out.float() - weight.float()).abs().max() <= 0.17 * weight.float().abs().max()


def test_reference_path_without_interpreter(reference_only, monkeypatch):
    torch.manual_seed(3)
    weight = torch.randn(37, 123, dtype=torch.bfloat16)
    packed, state = reference.quantize_nf4(weight, 64, True, nested_blocksize=4)

    def fail(*args, **kwargs):
        raise AssertionError("the Triton launcher ran on a CPU tensor without TRITON_INTERPRET=1")

    monkeypatch.setattr(nf4_module, "dequantize_nf4_forward", fail)
    assert torch.equal(dequantize_nf4(packed, state), reference.dequantize_nf4(packed, state))


def test_bad_inputs_raise_clear_errors():
    weight = torch.randn(37, 123)
    packed, state = reference.quantize_nf4(weight, 64)
    with pytest.raises(ValueError, match="needs"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(TypeError, match="out_dtype"):
        dequantize_nf4(packed, state, torch.int32)
    with pytest.raises(ValueError, match="one device"):
        dequantize_nf4(packed.to("meta"), state)
    with pytest.raises(TypeError, match="quant_state"):
        dequantize_nf4(packed, object())
    with pytest.raises(ValueError, match="absmax"):
        dequantize_nf4(packed, reference.QuantState(state.absmax[:-1], state.shape, state.code, 64))


def test_packed_in_another_storage_dtype(device):
    """bitsandbytes' quant_storage (e.g. bf16 for FSDP) holds the same bytes in another dtype: read as uint8."""
    torch.manual_seed(4)
    weight = torch.randn(40, 260, device=device, dtype=torch.bfloat16)
    packed, state = reference.quantize_nf4(weight, 64, True, nested_blocksize=4)
    as_bf16 = packed.reshape(-1).view(torch.bfloat16).unsqueeze(1)
    assert torch.equal(dequantize_nf4(as_bf16, state), dequantize_nf4(packed, state))


# --- the per-byte kernel's variants (benchmarks/sweep_kernels.py times them): each must stay bit-exact -------------

BYTES_VARIANTS = {
    "words-load": dict(kernel="bytes", lut="load", words=True, bytes_per_program=64, num_warps=2),
    "words-tree": dict(kernel="bytes", lut="tree", words=True, bytes_per_program=128, num_warps=4),
    "words-pair": dict(kernel="bytes", lut="pair", words=True, bytes_per_program=64, num_warps=2),
    "bytes-load": dict(kernel="bytes", lut="load", words=False, bytes_per_program=64, num_warps=2),
    "bytes-pair-hw-round": dict(kernel="bytes", lut="pair", words=False, bytes_per_program=32, hand_round=False),
}


@pytest.mark.parametrize("variant", BYTES_VARIANTS)
def test_bytes_kernel_variants_equal_bitsandbytes(device, variant, monkeypatch):
    """Odd sizes (whole bytes only: no int32 words), an LLM-like layout (words), double quantization, fp16 and bf16."""
    bnb_f = _bnb()
    for key, value in BYTES_VARIANTS[variant].items():
        monkeypatch.setitem(nf4_module.CONFIG, key, value)
    torch.manual_seed(5)
    for shape, dtype in [((37, 123), torch.bfloat16), ((48, 256), torch.float16)]:
        weight = torch.randn(shape, device=device, dtype=dtype)
        for compress, blocksize in [(False, 64), (True, 128)]:
            packed, state = bnb_f.quantize_4bit(
                weight, quant_type="nf4", compress_statistics=compress, blocksize=blocksize
            )
            expected = bnb_f.dequantize_4bit(packed, state)
            assert torch.equal(dequantize_nf4(packed, state), expected), (shape, dtype, compress, blocksize)


@pytest.mark.parametrize("variant", BYTES_VARIANTS)
def test_bytes_kernel_variants_equal_reference(device, variant):
    """Block sizes 32 and 4 (words need 8), a 3-D weight, float32 output, several second-level blocks."""
    torch.manual_seed(6)
    for shape, blocksize in [((40, 260), 32), ((3, 30, 17), 4), ((7,), 4)]:
        weight = torch.randn(shape, device=device)
        packed, state = reference.quantize_nf4(weight, blocksize, True, nested_blocksize=4)
        for dtype in (torch.float32, torch.bfloat16):
            got = dequantize_nf4_forward(packed, state, dtype, **BYTES_VARIANTS[variant])
            assert torch.equal(got, reference.dequantize_nf4(packed, state, dtype)), (shape, blocksize, dtype)


def test_out_fills_rows_of_a_stacking_buffer(device):
    """``out=``: three weights dequantized into consecutive rows of one buffer (the fused LoRA QKV does this)."""
    torch.manual_seed(7)
    weights = [torch.randn(rows, 64, device=device, dtype=torch.bfloat16) for rows in (6, 2, 3)]
    states = [reference.quantize_nf4(w, 64, True, nested_blocksize=4) for w in weights]
    buffer = torch.full((11, 64), float("nan"), device=device, dtype=torch.bfloat16)
    start = 0
    for (packed, state), w in zip(states, weights, strict=True):
        block = buffer[start : start + w.shape[0]]
        assert dequantize_nf4(packed, state, out=block) is block
        start += w.shape[0]
    assert torch.equal(buffer, torch.cat([dequantize_nf4(p, s) for p, s in states]))
    packed, state = states[0]
    with pytest.raises(ValueError, match="elements"):
        dequantize_nf4(packed, state, out=buffer[:5])
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_nf4(packed, state, out=torch.empty(64, 12, device=device, dtype=torch.bfloat16).t()[:6])
    with pytest.raises(ValueError, match="bfloat16 tensor"):
        dequantize_nf4(packed, state, torch.bfloat16, out=buffer[:6].float())


def test_out_on_the_reference_path(reference_only):
    weight = torch.randn(6, 64, dtype=torch.bfloat16)
    packed, state = reference.quantize_nf4(weight, 64)
    out = torch.empty(6, 64, dtype=torch.bfloat16)
    assert dequantize_nf4(packed, state, out=out) is out
    assert torch.equal(out, reference.dequantize_nf4(packed, state))


def test_pair_table_cache_follows_the_code_table(device):
    """The "pair" lookup caches a table built from quant_state.code: an in-place change of the code must show."""
    config = BYTES_VARIANTS["words-pair"]
    weight = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
    packed, state = reference.quantize_nf4(weight, 64)
    first = dequantize_nf4_forward(packed, state, torch.float32, **config)
    assert torch.equal(first, reference.dequantize_nf4(packed, state, torch.float32))
    state.code.mul_(2.0)  # same tensor, new values (its version counter moves)
    second = dequantize_nf4_forward(packed, state, torch.float32, **config)
    assert torch.equal(second, 2.0 * first)


def test_prepared_launch_follows_new_packed_data(device):
    """The launch prepared for a weight is reused across calls, but new packed bytes under the same quant_state (a
    weight moved or reloaded) are read, not the bytes the first launch was prepared with."""
    weight = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
    packed, state = reference.quantize_nf4(weight, 64)
    first = dequantize_nf4_forward(packed, state, torch.float32)
    assert torch.equal(dequantize_nf4_forward(packed, state, torch.float32), first)
    other = (packed ^ 0x11).clone()  # every index changes; same shape, same scales
    assert torch.equal(
        dequantize_nf4_forward(other, state, torch.float32), reference.dequantize_nf4(other, state, torch.float32)
    )


def test_repeated_launches_into_aligned_and_unaligned_outputs(device):
    """A plan's later launches (on a GPU: its kept compiled launcher, one per output alignment) write the same values
    as its first, whichever 16-byte alignment the output has."""
    weight = torch.randn(6, 64, device=device, dtype=torch.bfloat16)
    packed, state = reference.quantize_nf4(weight, 64)
    expected = reference.dequantize_nf4(packed, state, torch.bfloat16)
    storage = torch.empty(expected.numel() + 1, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        for offset in (0, 1):  # 1: two bytes past an aligned address
            out = storage[offset : offset + expected.numel()].view(expected.shape)
            out.fill_(float("nan"))
            assert dequantize_nf4_forward(packed, state, torch.bfloat16, out=out) is out
            assert torch.equal(out, expected), offset
