"""Argument validation of :func:`swiftune_kernels.rope.rope`: errors a user can act on, before anything runs."""

from __future__ import annotations

import torch

from swiftune_kernels.dispatch import check_floating, check_same_device


def check_rope_args(q, k, cos, sin, position_ids, rotary_dim):
    """Validate the arguments of :func:`rope`; returns the rotary dim."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_floating(name, t)
    check_same_device(q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D (batch, heads, seq, head_dim), got q {tuple(q.shape)} and k {tuple(k.shape)}; "
            "transpose a (batch, seq, heads, head_dim) tensor with .transpose(1, 2) first."
        )
    batch, _, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, seq and head_dim (only heads may differ)."
        )
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape.")
    width = cos.shape[-1]
    rotary_dim = width if rotary_dim is None else int(rotary_dim)
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and within 2..head_dim={head_dim}, got {rotary_dim}.")
    if width not in (rotary_dim, rotary_dim // 2):
        raise ValueError(
            f"cos/sin have {width} columns; with rotary_dim={rotary_dim} they need {rotary_dim} (full table) or "
            f"{rotary_dim // 2} (one angle per pair). Pass rotary_dim= to say how many channels rotate."
        )
    if cos.dim() == 2:
        if position_ids is None:
            if cos.shape[0] < seq_len:
                raise ValueError(f"cos/sin have {cos.shape[0]} positions but seq is {seq_len}; pass position_ids.")
        else:
            if position_ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"position_ids must be int32 or int64, got {position_ids.dtype}.")
            if (
                position_ids.dim() not in (1, 2)
                or position_ids.shape[-1] != seq_len
                or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch))
            ):
                raise ValueError(
                    f"position_ids must have shape ({batch}, {seq_len}), (1, {seq_len}) or ({seq_len},), "
                    f"got {tuple(position_ids.shape)}."
                )
    elif cos.dim() == 3:
        if position_ids is not None:
            raise ValueError(
                "cos/sin of shape (batch, seq, width) are already gathered per token; pass position_ids only "
                "with a (max_pos, width) table."
            )
        if cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
            raise ValueError(
                f"per-token cos/sin must have shape ({batch} or 1, {seq_len}, {width}), got {tuple(cos.shape)}."
            )
    else:
        raise ValueError(
            f"cos/sin must be a (max_pos, width) table or per-token (batch, seq, width), got {tuple(cos.shape)}."
        )
    return rotary_dim
