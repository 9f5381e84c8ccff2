"""Pure-torch rotary position embedding (RoPE) for q and k: the oracle and CPU fallback of ``swiftune_kernels.rope``.

The math, for one head vector ``x`` of one token and the pairs ``(a, b)`` of the convention (rotate-half, as in
Llama/NeoX: ``(i, i + rotary_dim/2)``; interleaved, as in GPT-J: ``(2i, 2i + 1)``)::

    out[a] = x[a] * cos[a] - x[b] * sin[a]
    out[b] = x[b] * cos[b] + x[a] * sin[b]

which is transformers' ``x * cos + rotate_half(x) * sin`` for rotate-half tables. Channels from ``rotary_dim`` to
``head_dim`` pass through unchanged. A half-width table (``rotary_dim/2`` columns) gives both members of a pair the
same angle. Computation is in float32 (float64 stays float64) and the result is stored in the dtype of q (of k).
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_tables(
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None,
    seq_len: int,
    rotary_dim: int,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, full-width cos and sin of shape (batch or 1, seq, rotary_dim), in the tables' dtype.

    ``cos``/``sin`` are either tables (max_pos, width) read at ``position_ids`` (or at 0..seq-1), or already
    gathered per token (batch or 1, seq, width); width is rotary_dim or rotary_dim/2.
    """
    if cos.dim() == 2:
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=cos.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        cos, sin = cos[position_ids], sin[position_ids]
    if cos.shape[-1] == rotary_dim // 2:
        if interleaved:
            cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        else:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return cos, sin


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool):
    compute = _compute_dtype(x.dtype)
    xc = x.to(compute)
    # (batch, seq, rotary_dim) -> (batch, 1, seq, rotary_dim): one angle per token, shared by every head
    cos, sin = cos.to(compute).unsqueeze(1), sin.to(compute).unsqueeze(1)
    x_rot, x_pass = xc[..., :rotary_dim], xc[..., rotary_dim:]
    out = x_rot * cos + _rotate(x_rot, interleaved) * sin
    return torch.cat((out, x_pass), dim=-1).to(x.dtype)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, q_heads, seq, head_dim) and k (batch, k_heads, seq, head_dim); see the module docstring.

    Arguments are those of :func:`swiftune_kernels.rope`, already validated by it.
    """
    rotary_dim = cos.shape[-1] if rotary_dim is None else rotary_dim
    cos, sin = gather_tables(cos, sin, position_ids, q.shape[2], rotary_dim, interleaved)
    return _rope_one(q, cos, sin, rotary_dim, interleaved), _rope_one(k, cos, sin, rotary_dim, interleaved)
