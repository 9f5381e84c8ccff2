"""Rotary position embedding (RoPE) of q and k in one Triton launch, forward and backward.

Layout is transformers' (batch, heads, seq, head_dim), with any strides whose last one is 1: the usual
``q_proj(x).view(b, s, h, d).transpose(1, 2)`` (physically (batch, seq, heads, head_dim)) is read and written in
place of its layout, with no copy. Outputs keep the layout of the inputs.

Two kernels, chosen per layout by :data:`CONFIG` (benchmarks/sweep_kernels.py times them). "heads" (here): one
program owns ``BLOCK_S`` tokens of one sequence and a group of heads of q or of k; it loads (and gathers by position
id) the cos/sin rows of its tokens once and reuses them for every head of its group; q and k groups share one grid so
both tensors are rotated by one launch. "tokens" (rope_tokens.py): one program owns a few tokens with all their
heads of q and k, which in transformers' layout are one contiguous run each, and loads their cos/sin rows once. The
backward is the same kernel with the transposed rotation (for the usual tables, the rotation by -theta).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swiftune_kernels.dispatch import use_triton
from swiftune_kernels.reference import rope as _reference
from swiftune_kernels.rope_checks import check_rope_args
from swiftune_kernels.rope_tokens import launch_tokens, rope_tables


def _cdiv(a: int, b: int) -> int:
    # plain Python: triton.cdiv / next_power_of_2 are constexpr functions that cost ~10 us a call on the host
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@triton.jit
def _rope_heads(
    x_ptr,
    out_ptr,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_ob,
    stride_oh,
    stride_os,
    pid_b,
    head_start,
    head_end,
    offs_s,
    mask_s,
    offs_i,
    mask_i,
    offs_t,
    mask_t,
    cos_a,
    cos_b,
    sin_a,
    sin_b,
    ROTARY_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COPY_TAIL: tl.constexpr,
):
    if INTERLEAVED:
        col_a = 2 * offs_i
        col_b = col_a + 1
    else:
        col_a = offs_i
        col_b = offs_i + ROTARY_DIM // 2
    mask = mask_s[:, None] & mask_i[None, :]
    mask_tail = mask_s[:, None] & mask_t[None, :]
    start = head_start.to(tl.int64)
    x_head = x_ptr + pid_b.to(tl.int64) * stride_xb + start * stride_xh + offs_s.to(tl.int64)[:, None] * stride_xs
    o_head = out_ptr + pid_b.to(tl.int64) * stride_ob + start * stride_oh + offs_s.to(tl.int64)[:, None] * stride_os
    # Two heads an iteration: the loads of both are in flight together (the loop is latency-bound otherwise).
    # Pointers advance by whole heads (64-bit pointer arithmetic, no int32 product to overflow).
    for h in range(head_start, head_end, 2):
        next_in_group = (offs_s * 0 + h + 1) < head_end  # a (BLOCK_S,) tensor also when h is a Python int
        mask_next = mask & next_in_group[:, None]
        x_a = tl.load(x_head + col_a[None, :], mask=mask, other=0.0).to(tl.float32)
        x_b = tl.load(x_head + col_b[None, :], mask=mask, other=0.0).to(tl.float32)
        y_a = tl.load(x_head + stride_xh + col_a[None, :], mask=mask_next, other=0.0).to(tl.float32)
        y_b = tl.load(x_head + stride_xh + col_b[None, :], mask=mask_next, other=0.0).to(tl.float32)
        tl.store(o_head + col_a[None, :], x_a * cos_a - x_b * sin_a, mask=mask)
        tl.store(o_head + col_b[None, :], x_b * cos_b + x_a * sin_b, mask=mask)
        tl.store(o_head + stride_oh + col_a[None, :], y_a * cos_a - y_b * sin_a, mask=mask_next)
        tl.store(o_head + stride_oh + col_b[None, :], y_b * cos_b + y_a * sin_b, mask=mask_next)
        if COPY_TAIL:
            # channels past rotary_dim pass through unchanged (partial rotary); bits are copied, no arithmetic
            mask_tail_next = mask_tail & next_in_group[:, None]
            tail_x = tl.load(x_head + ROTARY_DIM + offs_t[None, :], mask=mask_tail)
            tail_y = tl.load(x_head + stride_xh + ROTARY_DIM + offs_t[None, :], mask=mask_tail_next)
            tl.store(o_head + ROTARY_DIM + offs_t[None, :], tail_x, mask=mask_tail)
            tl.store(o_head + stride_oh + ROTARY_DIM + offs_t[None, :], tail_y, mask=mask_tail_next)
        x_head += 2 * stride_xh
        o_head += 2 * stride_oh


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_kob,
    stride_koh,
    stride_kos,
    stride_cb,
    stride_cs,
    stride_pb,
    stride_ps,
    seq_len,
    n_q_heads,
    n_k_heads,
    n_q_groups,
    n_s_blocks,
    heads_per_prog,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    HALF_TABLE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_POS: tl.constexpr,
    BACKWARD: tl.constexpr,
    COPY_TAIL: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    # consecutive programs take the token blocks of the same heads (contiguous in the (b, h, s, d) layout)
    pid = tl.program_id(0)
    pid_s = pid % n_s_blocks
    pid_g = pid // n_s_blocks
    pid_b = tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < seq_len
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_i = offs_i < ROTARY_DIM // 2
    offs_t = tl.arange(0, BLOCK_TAIL)
    mask_t = offs_t < HEAD_DIM - ROTARY_DIM
    cos_a, cos_b, sin_a, sin_b = rope_tables(
        cos_ptr, sin_ptr, pos_ptr, stride_cb, stride_cs, stride_pb, stride_ps, pid_b, offs_s, mask_s, offs_i, mask_i,
        ROTARY_DIM, HALF_TABLE, INTERLEAVED, HAS_POS, BACKWARD,
    )  # fmt: skip

    if pid_g < n_q_groups:
        head_start = pid_g * heads_per_prog
        _rope_heads(
            q_ptr, q_out_ptr, stride_qb, stride_qh, stride_qs, stride_qob, stride_qoh, stride_qos,
            pid_b, head_start, tl.minimum(head_start + heads_per_prog, n_q_heads),
            offs_s, mask_s, offs_i, mask_i, offs_t, mask_t, cos_a, cos_b, sin_a, sin_b,
            ROTARY_DIM, INTERLEAVED, COPY_TAIL,
        )  # fmt: skip
    else:
        head_start = (pid_g - n_q_groups) * heads_per_prog
        _rope_heads(
            k_ptr, k_out_ptr, stride_kb, stride_kh, stride_ks, stride_kob, stride_koh, stride_kos,
            pid_b, head_start, tl.minimum(head_start + heads_per_prog, n_k_heads),
            offs_s, mask_s, offs_i, mask_i, offs_t, mask_t, cos_a, cos_b, sin_a, sin_b,
            ROTARY_DIM, INTERLEAVED, COPY_TAIL,
        )  # fmt: skip


# ~8 programs of 4 warps per SM of an H100 (132 SMs): below that, fewer heads a program
_MIN_PROGRAMS = 1024
# Launch shape: elements of one (BLOCK_S, BLOCK_HALF) tile, most heads a program, warps a program. Swept on an H100
# (q 1x32x8192x128, k 1x8x8192x128, fwd+bwd, CUDA-graph time): 2 heads a program beat 8 by 3% in transformers'
# layout and 5% contiguous (more, shorter programs: a smaller last wave); larger tiles or 8 warps were slower.
_TILE_ELEMENTS = 1024
_MAX_HEADS_PER_PROGRAM = 2
_NUM_WARPS = 4
# Launch configuration (one line to switch to a sweep's winner, benchmarks/sweep_kernels.py), per layout: "heads"
# is _rope_kernel (a block of tokens a program, for a group of heads), "tokens" is rope_tokens._rope_tokens_kernel
# (``tokens_per_program`` tokens a program with all their heads in tiles of at most ``token_tile`` elements), with
# ``token_warps`` warps where cos/sin come one row a token (transformers' rotary embedding, the drop-in) and
# ``token_warps_gather`` where they are gathered from a table at position ids; ``token_eviction`` is the L2 policy
# of the q / k traffic, which streams. 2026-11-24 H100, transformers' layout, q 1x32x8192x128, k 8 heads, CUDA
# graphs, 3 interleaved repeats in one process (benchmarks/rope_variants.py): per-token half-width rows, 8 warps +
# evict_first 0.1193-0.1204 ms, without the hint 0.1210-0.1212, 4 warps 0.1216-0.1218, Liger 0.1212-0.1214; a
# full-width table at packed position ids, 1 warp + evict_first 0.1239-0.1241, without the hint 0.1318-0.1320,
# 8 warps 0.1273-0.1275.
CONFIG = {
    "hf_kernel": "tokens",
    "contiguous_kernel": "heads",
    "tokens_per_program": 1,
    "token_tile": 4096,
    "token_warps": 8,
    "token_warps_gather": 1,
    "token_eviction": "evict_first",
}


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, q_out, k_out, cos, sin, position_ids, rotary_dim, interleaved, backward):
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    assert k.shape[0] == batch and k.shape[2] == seq_len and k.shape[3] == head_dim
    if q.numel() == 0 and k.numel() == 0:
        return
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if cos.dim() == 2:  # a (max_pos, width) table, read at the token's position
        stride_cb, stride_cs = 0, cos.stride(0)
    else:  # (batch or 1, seq, width), already one row per token
        stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
        stride_cs = cos.stride(1)
    if position_ids is not None:
        pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        stride_pb = pos.stride(0) if pos.shape[0] > 1 else 0
        stride_ps = pos.stride(1)
    else:
        pos, stride_pb, stride_ps = cos, 0, 0  # never read: HAS_POS is False

    half = rotary_dim // 2
    block_half = _next_power_of_2(half)
    tail = head_dim - rotary_dim
    block_tail = _next_power_of_2(max(tail, 1))
    heads_inner = q.stride(1) <= q.stride(2) and k.stride(1) <= k.stride(2)  # transformers' (b, s, h, d) storage
    kernel = CONFIG["hf_kernel"] if heads_inner else CONFIG["contiguous_kernel"]
    assert kernel in ("heads", "tokens"), kernel
    args = (
        q, k, q_out, k_out, cos, sin, pos,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        stride_cb, stride_cs, stride_pb, stride_ps, seq_len, n_q_heads, n_k_heads,
    )  # fmt: skip
    flags = dict(
        HEAD_DIM=head_dim,
        ROTARY_DIM=rotary_dim,
        HALF_TABLE=cos.shape[-1] != rotary_dim,
        INTERLEAVED=interleaved,
        HAS_POS=position_ids is not None,
        BACKWARD=backward,
        COPY_TAIL=tail > 0 and (q_out.data_ptr() != q.data_ptr() or k_out.data_ptr() != k.data_ptr()),
        BLOCK_HALF=block_half,
        BLOCK_TAIL=block_tail,
    )
    if kernel == "tokens":
        launch_tokens(
            args, flags, seq_len, batch, n_q_heads, n_k_heads,
            CONFIG["tokens_per_program"], CONFIG["token_tile"],
            CONFIG["token_warps_gather" if position_ids is not None else "token_warps"], CONFIG["token_eviction"],
        )  # fmt: skip
        return
    # ~1024 elements per (BLOCK_S, BLOCK_HALF) tile: the 4 table tiles and 2 heads' data stay in registers
    # (72 a thread at 4 warps for head_dim 128 on sm_90, by ptxas), so ~7 programs reside per SM, each with
    # 8 KB of loads in flight: ~7 MB over an H100, well above bandwidth x latency (~2 MB).
    block_s = max(1, min(_next_power_of_2(seq_len), _TILE_ELEMENTS // max(block_half, block_tail // 2), 128))
    n_s_blocks = _cdiv(seq_len, block_s)
    # Enough heads a program to amortize its cos/sin loads, but enough programs to fill an H100.
    heads_per_prog = _MAX_HEADS_PER_PROGRAM
    while (
        heads_per_prog > 1
        and batch * n_s_blocks * (_cdiv(n_q_heads, heads_per_prog) + _cdiv(n_k_heads, heads_per_prog)) < _MIN_PROGRAMS
    ):
        heads_per_prog //= 2
    n_q_groups = _cdiv(n_q_heads, heads_per_prog)
    n_groups = n_q_groups + _cdiv(n_k_heads, heads_per_prog)
    _rope_kernel[(n_s_blocks * n_groups, batch)](
        *args, n_q_groups, n_s_blocks, heads_per_prog, **flags,
        BLOCK_S=block_s, num_warps=_NUM_WARPS,
    )  # fmt: skip


def rope_forward(q, k, cos, sin, position_ids, rotary_dim, interleaved, inplace=False):
    """Launch the rotation of q and k; returns (q_out, k_out), which are q and k themselves when ``inplace``."""
    if inplace:
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("inplace=True needs q and k with a last stride of 1; call .contiguous() or drop inplace.")
        q_out, k_out = q, k
    else:
        q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _launch(q, k, q_out, k_out, cos, sin, position_ids, rotary_dim, interleaved, backward=False)
    return q_out, k_out


def rope_backward(dq_out, dk_out, cos, sin, position_ids, rotary_dim, interleaved):
    """Launch the transposed rotation of the output gradients; returns (dq, dk)."""
    dq_out, dk_out = _last_dim_contiguous(dq_out), _last_dim_contiguous(dk_out)
    dq, dk = torch.empty_like(dq_out), torch.empty_like(dk_out)
    _launch(dq_out, dk_out, dq, dk, cos, sin, position_ids, rotary_dim, interleaved, backward=True)
    return dq, dk


class RoPEFunction(torch.autograd.Function):
    """Autograd of :func:`rope` on the Triton path; cos, sin and position ids get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, rotary_dim, interleaved, inplace):
        q_out, k_out = rope_forward(q, k, cos, sin, position_ids, rotary_dim, interleaved, inplace)
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.rotary_dim = rotary_dim
        ctx.interleaved = interleaved
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = rope_backward(dq_out, dk_out, cos, sin, position_ids, ctx.rotary_dim, ctx.interleaved)
        return dq, dk, None, None, None, None, None, None


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embedding to q and k (one kernel launch for both).

    For each pair of channels (a, b): ``out_a = x_a cos_a - x_b sin_a`` and ``out_b = x_b cos_b + x_a sin_b``;
    channels from ``rotary_dim`` on pass through. Computed in float32, stored in the dtype of q (of k).

    Args:
        q: (batch, q_heads, seq, head_dim), any strides with a last stride of 1.
        k: (batch, k_heads, seq, head_dim); k_heads may differ from q_heads (GQA/MQA).
        cos: either a table (max_pos, width) read at ``position_ids`` (at 0..seq-1 when None), or per-token
            (batch or 1, seq, width) as transformers' rotary embedding returns it. ``width`` is ``rotary_dim``
            (transformers' layout: cat(freqs, freqs) for rotate-half, repeat_interleave for interleaved) or
            ``rotary_dim / 2`` (one angle per pair, as flash-attn's tables).
        sin: same shape as ``cos``.
        position_ids: (batch, seq), (1, seq) or (seq,) int32/int64 rows of the table; positions may restart
            inside a row (packed sequences). They must lie in [0, max_pos): they are not range-checked on GPU.
        rotary_dim: number of leading channels that rotate (partial rotary, e.g. Phi/NeoX); default: the
            width of ``cos``. A half-width table therefore needs ``rotary_dim`` passed.
        interleaved: False pairs (i, i + rotary_dim/2) (rotate-half: Llama, NeoX); True pairs (2i, 2i+1) (GPT-J).
        inplace: write the result into q and k and return them (saves two allocations; q and k must not be
            needed elsewhere). While autograd tracks them, q and k must be neither leaves nor views.

    Returns:
        (q_out, k_out) with the shapes, dtypes and layouts of q and k.
    """
    rotary_dim = check_rope_args(q, k, cos, sin, position_ids, rotary_dim)
    interleaved, inplace = bool(interleaved), bool(inplace)
    tracked = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if inplace and tracked and (q._is_view() or k._is_view()):
        # autograd cannot rebase two outputs of one Function onto views; checked before anything is written
        raise ValueError(
            "inplace=True cannot rotate q or k that are views (e.g. .transpose(1, 2) of a projection) while they "
            "require grad; drop inplace (the out-of-place result keeps their layout) or pass non-view tensors."
        )
    if use_triton(q):
        if not tracked:  # no graph to record: launch directly (this also returns q and k themselves when inplace)
            return rope_forward(q, k, cos, sin, position_ids, rotary_dim, interleaved, inplace)
        return RoPEFunction.apply(q, k, cos, sin, position_ids, rotary_dim, interleaved, inplace)
    q_out, k_out = _reference.rope(q, k, cos, sin, position_ids, rotary_dim, interleaved)
    if inplace:
        return q.copy_(q_out), k.copy_(k_out)
    return q_out, k_out


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (rotate-half), for patching attention modules.

    Same signature and result as Llama's (and as NeoX/Phi3's partial rotary when cos is narrower than head_dim:
    the first ``cos.shape[-1]`` channels rotate, the rest pass through), for tables built as transformers builds
    them, ``cat(freqs, freqs)``: only their first half is read. For tables whose halves differ, call :func:`rope`.

    Args:
        q: (batch, q_heads, seq, head_dim), or (batch, seq, q_heads, head_dim) with ``unsqueeze_dim=2``.
        k: like q, with k_heads heads.
        cos: (batch or 1, seq, rotary_dim), as returned by transformers' rotary embedding module.
        sin: same shape as ``cos``.
        unsqueeze_dim: 1 for (batch, heads, seq, head_dim) inputs, 2 for (batch, seq, heads, head_dim).

    Returns:
        (q_embed, k_embed) shaped as q and k.
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"unsqueeze_dim must be 1 (batch, heads, seq, dim) or 2 (batch, seq, heads, dim), got {unsqueeze_dim}."
        )
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D, got q {tuple(q.shape)} and k {tuple(k.shape)}.")
    # transformers builds rotate-half tables as cat(freqs, freqs): both halves hold the same angles, so the kernel
    # reads only the first (half the table traffic; a half-width table is one angle per pair).
    rotary_dim = cos.shape[-1]
    cos, sin = cos[..., : rotary_dim // 2], sin[..., : rotary_dim // 2]
    if unsqueeze_dim == 2:  # views only: the kernel follows the strides
        q_out, k_out = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, rotary_dim=rotary_dim)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return rope(q, k, cos, sin, rotary_dim=rotary_dim)
