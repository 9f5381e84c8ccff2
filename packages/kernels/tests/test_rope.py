"""RoPE: the Triton path (the interpreter on CPU) against the float64 reference, forward and gradients of q and k."""

import importlib
import math

import pytest
import torch

from swiftune_kernels.reference import rope as reference
from swiftune_kernels.rope import RoPEFunction, apply_rotary_pos_emb, rope

# the module, not the function of the same name that the package exports
rope_module = importlib.import_module("swiftune_kernels.rope")

BATCH, Q_HEADS, K_HEADS, SEQ, HEAD_DIM = 2, 6, 2, 37, 24
MAX_POS = 64


def _angle_tables(max_pos, rotary_dim, interleaved, half, dtype=torch.float32, base=100.0):
    """Real RoPE tables: cos/sin of pos * inv_freq, laid out as transformers does (or half-width)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    if not half:
        angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _packed_positions(batch, seq):
    """Row 0: two packed samples (positions restart at 20); row 1: three samples of other lengths."""
    row0 = torch.cat((torch.arange(20), torch.arange(seq - 20)))
    row1 = torch.cat((torch.arange(5), torch.arange(11), torch.arange(seq - 16)))
    return torch.stack((row0, row1))[:batch]


def _inputs(device, dtype, q_heads=Q_HEADS, k_heads=K_HEADS, seq=SEQ, head_dim=HEAD_DIM):
    torch.manual_seed(0)
    q = torch.randn(BATCH, q_heads, seq, head_dim, device=device).to(dtype)
    k = torch.randn(BATCH, k_heads, seq, head_dim, device=device).to(dtype)
    return q, k


def _check_against_reference(q, k, cos, sin, position_ids, rotary_dim, interleaved, tolerance):
    """Forward and gradients of the dispatched op against the reference run on float64 copies."""
    q = q.detach().requires_grad_(True)
    k = k.detach().requires_grad_(True)
    q_out, k_out = rope(q, k, cos, sin, position_ids, rotary_dim=rotary_dim, interleaved=interleaved)
    torch.manual_seed(1)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out), inputs=[q, k])

    q64 = q.detach().double().requires_grad_(True)
    k64 = k.detach().double().requires_grad_(True)
    q_ref, k_ref = reference.rope(q64, k64, cos.double(), sin.double(), position_ids, rotary_dim, interleaved)
    torch.autograd.backward((q_ref, k_ref), (dq_out.double(), dk_out.double()), inputs=[q64, k64])

    tol = tolerance(q.dtype)
    torch.testing.assert_close(q_out.double(), q_ref.detach(), **tol)
    torch.testing.assert_close(k_out.double(), k_ref.detach(), **tol)
    torch.testing.assert_close(q.grad.double(), q64.grad, **tol)
    torch.testing.assert_close(k.grad.double(), k64.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, HEAD_DIM])
@pytest.mark.parametrize("half_table", [False, True])
def test_rope_table_with_packed_positions(device, tolerance, dtype, interleaved, rotary_dim, half_table):
    q, k = _inputs(device, dtype)
    cos, sin = _angle_tables(MAX_POS, rotary_dim, interleaved, half_table)
    # perturb so the two members of a pair read different table entries: a wrong column fails the test
    cos, sin = cos + 0.01 * torch.randn_like(cos), sin + 0.01 * torch.randn_like(sin)
    positions = _packed_positions(BATCH, SEQ).to(device)
    _check_against_reference(q, k, cos.to(device), sin.to(device), positions, rotary_dim, interleaved, tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cos_batch", [1, BATCH])
def test_rope_per_token_tables_as_transformers_passes_them(device, tolerance, dtype, cos_batch):
    q, k = _inputs(device, dtype, q_heads=3, k_heads=1)  # MQA
    cos, sin = _angle_tables(MAX_POS, HEAD_DIM, False, False, dtype=dtype)
    positions = _packed_positions(BATCH, SEQ)[:cos_batch]
    cos, sin = cos[positions].to(device), sin[positions].to(device)  # (cos_batch, seq, head_dim)
    _check_against_reference(q, k, cos, sin, None, None, False, tolerance)


def test_rope_many_heads_per_program_and_seq_blocks(device, tolerance, monkeypatch):
    """Few programs allowed: 8 heads a program (two q groups, the last partial) and 3 blocks of tokens."""
    monkeypatch.setattr(rope_module, "_MIN_PROGRAMS", 1)
    q, k = _inputs(device, torch.float32, q_heads=11, k_heads=3, seq=257, head_dim=12)
    cos, sin = _angle_tables(300, 8, False, False)
    positions = torch.cat((torch.arange(100), torch.arange(157))).repeat(BATCH, 1).to(device)
    _check_against_reference(q, k, cos.to(device), sin.to(device), positions, 8, False, tolerance)


def _complex_rotation(x, angles, interleaved):
    """Each pair as one complex number times exp(i * angle): the definition of RoPE."""
    half = angles.shape[-1]
    if interleaved:
        pairs = torch.complex(x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2])
    else:
        pairs = torch.complex(x[..., :half], x[..., half : 2 * half])
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    out = x.clone()
    if interleaved:
        out[..., 0 : 2 * half : 2], out[..., 1 : 2 * half : 2] = rotated.real, rotated.imag
    else:
        out[..., :half], out[..., half : 2 * half] = rotated.real, rotated.imag
    return out


@pytest.mark.parametrize("interleaved", [False, True])
def test_reference_is_the_complex_rotation(interleaved):
    """The oracle itself: rotating each pair by its angle, tail untouched, positions read per token."""
    q, k = _inputs("cpu", torch.float64)
    rotary_dim = 16
    cos, sin = _angle_tables(MAX_POS, rotary_dim, interleaved, half=False, dtype=torch.float64)
    positions = _packed_positions(BATCH, SEQ)
    inv_freq = 1.0 / 100.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = (positions[:, None, :, None] * inv_freq).double()  # (batch, 1, seq, rotary_dim / 2)
    q_ref, k_ref = reference.rope(q, k, cos, sin, positions, rotary_dim, interleaved)
    torch.testing.assert_close(q_ref, _complex_rotation(q, angles, interleaved))
    torch.testing.assert_close(k_ref, _complex_rotation(k, angles, interleaved))


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("rotary_dim", [16, HEAD_DIM])
def test_apply_rotary_pos_emb_matches_transformers(device, tolerance, unsqueeze_dim, rotary_dim):
    """transformers' formula (Llama; NeoX/Phi3 partial), on q laid out as the projections produce it."""
    torch.manual_seed(0)
    # (batch, seq, heads, dim) storage, as q_proj(x).view(b, s, h, d); unsqueeze_dim=1 sees it transposed
    q_bshd = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device=device)
    k_bshd = torch.randn(BATCH, SEQ, K_HEADS, HEAD_DIM, device=device)
    q, k = (q_bshd.transpose(1, 2), k_bshd.transpose(1, 2)) if unsqueeze_dim == 1 else (q_bshd, k_bshd)
    cos, sin = _angle_tables(MAX_POS, rotary_dim, False, False)
    positions = _packed_positions(BATCH, SEQ)
    cos, sin = cos[positions].to(device), sin[positions].to(device)

    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)

    c, s = cos.unsqueeze(unsqueeze_dim).double(), sin.unsqueeze(unsqueeze_dim).double()
    for x, out in ((q, q_out), (k, k_out)):
        x_rot, x_pass = x.double()[..., :rotary_dim], x.double()[..., rotary_dim:]
        expected = torch.cat((x_rot * c + rotate_half(x_rot) * s, x_pass), dim=-1)
        torch.testing.assert_close(out.double(), expected, **tolerance(torch.float32))
        assert out.stride() == x.stride()  # the output keeps the projection's layout: no copy for attention


def test_table_without_position_ids_reads_rows_zero_to_seq(device):
    q, k = _inputs(device, torch.float32)
    cos, sin = _angle_tables(MAX_POS, HEAD_DIM, False, False)
    cos, sin = cos.to(device), sin.to(device)
    implicit = rope(q, k, cos, sin)
    explicit = rope(q, k, cos, sin, torch.arange(SEQ, device=device))
    shared = rope(q, k, cos, sin, torch.arange(SEQ, device=device)[None, :].expand(BATCH, SEQ))
    for a, b, c in zip(implicit, explicit, shared, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("rotary_dim", [16, HEAD_DIM])
def test_inplace_writes_into_q_and_k_and_keeps_gradients(device, tolerance, rotary_dim):
    q0, k0 = _inputs(device, torch.float32)
    cos, sin = _angle_tables(MAX_POS, rotary_dim, False, False)
    cos, sin = cos.to(device), sin.to(device)
    positions = _packed_positions(BATCH, SEQ).to(device)
    expected = rope(q0, k0, cos, sin, positions, rotary_dim=rotary_dim)

    q_leaf = q0.clone().requires_grad_(True)
    k_leaf = k0.clone().requires_grad_(True)
    q, k = q_leaf * 1.0, k_leaf * 1.0  # non-leaf, as a projection's output
    q_out, k_out = rope(q, k, cos, sin, positions, rotary_dim=rotary_dim, inplace=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(k, expected[1], rtol=0, atol=0)
    (q_out.sum() + 2 * k_out.sum()).backward()

    q_ref = q0.clone().requires_grad_(True)
    k_ref = k0.clone().requires_grad_(True)
    out = rope(q_ref, k_ref, cos, sin, positions, rotary_dim=rotary_dim)
    (out[0].sum() + 2 * out[1].sum()).backward()
    torch.testing.assert_close(q_leaf.grad, q_ref.grad, **tolerance(torch.float32))
    torch.testing.assert_close(k_leaf.grad, k_ref.grad, **tolerance(torch.float32))


def test_inplace_on_views_refused_under_autograd_and_allowed_without(device):
    q0, k0 = _inputs(device, torch.float32)
    cos, sin = _angle_tables(MAX_POS, HEAD_DIM, False, False)
    cos, sin = cos.to(device), sin.to(device)
    expected = rope(q0, k0, cos, sin)
    q_bshd = q0.transpose(1, 2).contiguous().requires_grad_(True)
    k_bshd = k0.transpose(1, 2).contiguous().requires_grad_(True)
    q, k = (q_bshd * 1.0).transpose(1, 2), (k_bshd * 1.0).transpose(1, 2)
    with pytest.raises(ValueError, match="views"):
        rope(q, k, cos, sin, inplace=True)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # refused before anything was written
    with torch.no_grad():
        q_out, k_out = rope(q, k, cos, sin, inplace=True)
    assert q_out is q and k_out is k
    torch.testing.assert_close(q, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(k, expected[1], rtol=0, atol=0)


def test_inputs_are_untouched_and_frozen_k_gets_no_gradient(device):
    q, k = _inputs(device, torch.float32)
    q_before, k_before = q.clone(), k.clone()
    q.requires_grad_(True)
    cos, sin = _angle_tables(MAX_POS, HEAD_DIM, False, False)
    q_out, k_out = rope(q, k, cos.to(device), sin.to(device))
    (q_out.sum() + k_out.sum()).backward()
    assert torch.equal(q.detach(), q_before) and torch.equal(k, k_before)
    assert q.grad is not None and k.grad is None


def test_reference_path_without_interpreter(reference_only, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton path ran without the interpreter")

    monkeypatch.setattr(RoPEFunction, "apply", fail)
    q, k = _inputs("cpu", torch.float32)
    cos, sin = _angle_tables(MAX_POS, 16, True, True)
    positions = _packed_positions(BATCH, SEQ)
    out = rope(q, k, cos, sin, positions, rotary_dim=16, interleaved=True)
    expected = reference.rope(q, k, cos, sin, positions, 16, True)
    for a, b in zip(out, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    q_in, k_in = q.clone(), k.clone()
    q_out, k_out = rope(q_in, k_in, cos, sin, positions, rotary_dim=16, interleaved=True, inplace=True)
    assert q_out is q_in and k_out is k_in
    torch.testing.assert_close(q_in, expected[0], rtol=0, atol=0)


def _valid():
    q = torch.zeros(BATCH, Q_HEADS, SEQ, HEAD_DIM)
    k = torch.zeros(BATCH, K_HEADS, SEQ, HEAD_DIM)
    cos, sin = _angle_tables(MAX_POS, HEAD_DIM, False, False)
    return dict(q=q, k=k, cos=cos, sin=sin)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(k=torch.zeros(BATCH, K_HEADS, SEQ + 1, HEAD_DIM)), ValueError, "must agree on batch, seq and head_dim"),
        (dict(k=torch.zeros(BATCH, K_HEADS, SEQ, HEAD_DIM - 2)), ValueError, "must agree on batch, seq and head_dim"),
        (dict(q=torch.zeros(BATCH, SEQ, HEAD_DIM)), ValueError, "must be 4-D"),
        (dict(sin=torch.zeros(MAX_POS, HEAD_DIM // 2)), ValueError, "must have the same shape"),
        (dict(rotary_dim=15), ValueError, "rotary_dim must be even"),
        (dict(rotary_dim=HEAD_DIM + 2), ValueError, "rotary_dim must be even"),
        (dict(rotary_dim=16), ValueError, "cos/sin have 24 columns"),
        (dict(cos=torch.zeros(SEQ - 1, HEAD_DIM), sin=torch.zeros(SEQ - 1, HEAD_DIM)), ValueError, "pass position"),
        (dict(position_ids=torch.zeros(BATCH, SEQ + 1, dtype=torch.long)), ValueError, "position_ids must have"),
        (dict(position_ids=torch.zeros(BATCH + 1, SEQ, dtype=torch.long)), ValueError, "position_ids must have"),
        (dict(position_ids=torch.zeros(BATCH, SEQ)), TypeError, "int32 or int64"),
        (dict(cos=torch.zeros(BATCH, SEQ + 1, HEAD_DIM), sin=torch.zeros(BATCH, SEQ + 1, HEAD_DIM)),
         ValueError, "per-token"),
        (dict(cos=torch.zeros(1, 1, SEQ, HEAD_DIM), sin=torch.zeros(1, 1, SEQ, HEAD_DIM)), ValueError, "must be a"),
        (dict(q=torch.zeros(BATCH, Q_HEADS, SEQ, HEAD_DIM, dtype=torch.int32)), TypeError, "must be float32"),
        (dict(cos=torch.zeros(MAX_POS, HEAD_DIM, device="meta")), ValueError, "one device"),
    ],
)  # fmt: skip
def test_mistakes_raise_clear_errors(change, error, match):
    args = {**_valid(), **change}
    with pytest.raises(error, match=match):
        rope(**args)


def test_gathered_tables_refuse_position_ids():
    args = _valid()
    cos, sin = args["cos"][:SEQ][None], args["sin"][:SEQ][None]
    with pytest.raises(ValueError, match="already gathered per token"):
        rope(args["q"], args["k"], cos, sin, torch.arange(SEQ))


def test_apply_rotary_pos_emb_refuses_other_unsqueeze_dims():
    args = _valid()
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        apply_rotary_pos_emb(args["q"], args["k"], args["cos"][:SEQ][None], args["sin"][:SEQ][None], unsqueeze_dim=0)


def test_angle_tables_helper_is_sane():
    cos, sin = _angle_tables(4, 8, False, False, dtype=torch.float64)
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos))
    assert math.isclose(sin[1, 0].item(), math.sin(1.0))


# --- launch variants (benchmarks/sweep_kernels.py times them): each must give the same rotation --------------------

ROPE_VARIANTS = {
    # 2 tokens a program; a 32-element tile budget forces head blocks of 2 (the head loop, a partial last block)
    "tokens": dict(hf_kernel="tokens", contiguous_kernel="tokens", tokens_per_program=2, token_tile=32, token_warps=2),
    "tokens-one": dict(hf_kernel="tokens", contiguous_kernel="tokens", tokens_per_program=1, token_warps=4),
    "tokens-no-hint": dict(hf_kernel="tokens", contiguous_kernel="tokens", token_eviction="", token_warps_gather=2),
    "heads": dict(hf_kernel="heads", contiguous_kernel="heads"),
}


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
@pytest.mark.parametrize("layout", ["hf", "contiguous"])
def test_launch_variants_match_reference(device, tolerance, monkeypatch, variant, layout):
    for key, value in ROPE_VARIANTS[variant].items():
        monkeypatch.setitem(rope_module.CONFIG, key, value)
    torch.manual_seed(2)
    q_heads, k_heads, seq = 5, 2, 13
    if layout == "hf":  # q_proj(x).view(b, s, h, d).transpose(1, 2): one token's heads are contiguous
        q = torch.randn(BATCH, seq, q_heads, HEAD_DIM, device=device).transpose(1, 2)
        k = torch.randn(BATCH, seq, k_heads, HEAD_DIM, device=device).transpose(1, 2)
    else:
        q = torch.randn(BATCH, q_heads, seq, HEAD_DIM, device=device)
        k = torch.randn(BATCH, k_heads, seq, HEAD_DIM, device=device)
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    positions = _packed_positions(BATCH, 37)[:, :seq].to(device)
    # partial rotary with interleaved pairs (the tail is copied), then a full half-width table
    for rotary_dim, interleaved, half in ((16, True, False), (HEAD_DIM, False, True)):
        cos, sin = _angle_tables(MAX_POS, rotary_dim, interleaved, half)
        cos, sin = cos + 0.01 * torch.randn_like(cos), sin + 0.01 * torch.randn_like(sin)
        _check_against_reference(q, k, cos.to(device), sin.to(device), positions, rotary_dim, interleaved, tolerance)
