"""The "tokens" RoPE kernel (a few tokens a program, all their q and k heads), and the cos/sin row loader that both
RoPE kernels share. Launched by :mod:`swiftune_kernels.rope`, whose ``CONFIG`` picks the kernel per layout.

In transformers' (batch, seq, heads, head_dim) storage one token's heads of q (of k) are one contiguous run: a
program that owns a token reads and writes that run whole and loads the token's cos/sin row once for all heads.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@triton.jit
def rope_tables(
    cos_ptr,
    sin_ptr,
    pos_ptr,
    stride_cb,
    stride_cs,
    stride_pb,
    stride_ps,
    pid_b,
    offs_s,
    mask_s,
    offs_i,
    mask_i,
    ROTARY_DIM: tl.constexpr,
    HALF_TABLE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_POS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # (cos_a, cos_b, sin_a, sin_b), each (BLOCK_S, BLOCK_HALF) in float32, for the tokens offs_s of batch pid_b
    if HAS_POS:
        rows = tl.load(pos_ptr + pid_b.to(tl.int64) * stride_pb + offs_s.to(tl.int64) * stride_ps, mask=mask_s, other=0)
        rows = rows.to(tl.int64)
    else:
        rows = offs_s.to(tl.int64)
    table = pid_b.to(tl.int64) * stride_cb + rows[:, None] * stride_cs
    # Table columns of the pair (a, b): a half-width table gives both members the angle of column i.
    if HALF_TABLE:
        col_a = offs_i
        col_b = offs_i
    elif INTERLEAVED:
        col_a = 2 * offs_i
        col_b = col_a + 1
    else:
        col_a = offs_i
        col_b = offs_i + ROTARY_DIM // 2
    mask = mask_s[:, None] & mask_i[None, :]
    cos_a = tl.load(cos_ptr + table + col_a[None, :], mask=mask, other=0.0).to(tl.float32)
    sin_a = tl.load(sin_ptr + table + col_a[None, :], mask=mask, other=0.0).to(tl.float32)
    if HALF_TABLE:
        cos_b = cos_a
        sin_b = sin_a
    else:
        cos_b = tl.load(cos_ptr + table + col_b[None, :], mask=mask, other=0.0).to(tl.float32)
        sin_b = tl.load(sin_ptr + table + col_b[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The gradient is the transposed map: [[cos_a, -sin_a], [sin_b, cos_b]]^T, i.e. the forward with the
        # sines swapped and negated (the rotation by -theta when the two halves of the table agree).
        neg_sin_b = -sin_b
        sin_b = -sin_a
        sin_a = neg_sin_b
    return cos_a, cos_b, sin_a, sin_b


@triton.jit
def _rope_token_heads(
    x_ptr,
    out_ptr,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_ob,
    stride_oh,
    stride_os,
    pid_b,
    n_heads,
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
    BLOCK_H: tl.constexpr,
    EVICTION: tl.constexpr,
):
    # (tokens, heads, channels) tiles: in transformers' layout one token's heads are one contiguous run
    if INTERLEAVED:
        col_a = 2 * offs_i
        col_b = col_a + 1
    else:
        col_a = offs_i
        col_b = offs_i + ROTARY_DIM // 2
    cos_a, cos_b, sin_a, sin_b = cos_a[:, None, :], cos_b[:, None, :], sin_a[:, None, :], sin_b[:, None, :]
    tokens = offs_s.to(tl.int64)[:, None, None]
    x_tok = x_ptr + pid_b.to(tl.int64) * stride_xb + tokens * stride_xs
    o_tok = out_ptr + pid_b.to(tl.int64) * stride_ob + tokens * stride_os
    for h in range(0, n_heads, BLOCK_H):
        heads = h + tl.arange(0, BLOCK_H)
        mask_sh = mask_s[:, None, None] & (heads < n_heads)[None, :, None]
        mask = mask_sh & mask_i[None, None, :]
        x_h = x_tok + heads.to(tl.int64)[None, :, None] * stride_xh
        o_h = o_tok + heads.to(tl.int64)[None, :, None] * stride_oh
        x_a = tl.load(x_h + col_a[None, None, :], mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)
        x_b = tl.load(x_h + col_b[None, None, :], mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)
        tl.store(o_h + col_a[None, None, :], x_a * cos_a - x_b * sin_a, mask=mask, eviction_policy=EVICTION)
        tl.store(o_h + col_b[None, None, :], x_b * cos_b + x_a * sin_b, mask=mask, eviction_policy=EVICTION)
        if COPY_TAIL:
            mask_tail = mask_sh & mask_t[None, None, :]
            tail = tl.load(x_h + ROTARY_DIM + offs_t[None, None, :], mask=mask_tail)
            tl.store(o_h + ROTARY_DIM + offs_t[None, None, :], tail, mask=mask_tail)


@triton.jit
def _rope_tokens_kernel(
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
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    HALF_TABLE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_POS: tl.constexpr,
    BACKWARD: tl.constexpr,
    COPY_TAIL: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    EVICTION: tl.constexpr,
):
    # One program: BLOCK_S tokens, all their heads of q and k, the cos/sin rows loaded once.
    pid_b = tl.program_id(1)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < seq_len
    offs_i = tl.arange(0, BLOCK_HALF)
    mask_i = offs_i < ROTARY_DIM // 2
    offs_t = tl.arange(0, BLOCK_TAIL)
    mask_t = offs_t < HEAD_DIM - ROTARY_DIM
    cos_a, cos_b, sin_a, sin_b = rope_tables(
        cos_ptr, sin_ptr, pos_ptr, stride_cb, stride_cs, stride_pb, stride_ps, pid_b, offs_s, mask_s, offs_i, mask_i,
        ROTARY_DIM, HALF_TABLE, INTERLEAVED, HAS_POS, BACKWARD,
    )  # fmt: skip
    _rope_token_heads(
        q_ptr, q_out_ptr, stride_qb, stride_qh, stride_qs, stride_qob, stride_qoh, stride_qos, pid_b, n_q_heads,
        offs_s, mask_s, offs_i, mask_i, offs_t, mask_t, cos_a, cos_b, sin_a, sin_b,
        ROTARY_DIM, INTERLEAVED, COPY_TAIL, BLOCK_HQ, EVICTION,
    )  # fmt: skip
    _rope_token_heads(
        k_ptr, k_out_ptr, stride_kb, stride_kh, stride_ks, stride_kob, stride_koh, stride_kos, pid_b, n_k_heads,
        offs_s, mask_s, offs_i, mask_i, offs_t, mask_t, cos_a, cos_b, sin_a, sin_b,
        ROTARY_DIM, INTERLEAVED, COPY_TAIL, BLOCK_HK, EVICTION,
    )  # fmt: skip


def launch_tokens(
    args, flags, seq_len, batch, n_q_heads, n_k_heads, tokens_per_program, token_tile, num_warps, eviction=""
):
    """Launch :func:`_rope_tokens_kernel` over (token blocks, batch) with the arguments :func:`rope._launch` built.

    ``eviction``: the L2 eviction policy of the q / k loads and stores ("" or e.g. "evict_first": they stream).
    """
    block_s = min(_next_power_of_2(seq_len), tokens_per_program)
    # heads a tile: as many as fit ``token_tile`` elements of one half of the rotated channels
    heads_cap = max(1, token_tile // (block_s * max(flags["BLOCK_HALF"], flags["BLOCK_TAIL"])))
    _rope_tokens_kernel[(-(-seq_len // block_s), batch)](
        *args, **flags, BLOCK_S=block_s,
        BLOCK_HQ=min(_next_power_of_2(n_q_heads), heads_cap),
        BLOCK_HK=min(_next_power_of_2(n_k_heads), heads_cap), EVICTION=eviction, num_warps=num_warps,
    )  # fmt: skip
