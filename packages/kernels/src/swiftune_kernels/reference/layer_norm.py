"""Pure-torch LayerNorm: the oracle, the CPU fallback and the statement of the math of ``layer_norm``."""

from __future__ import annotations

import torch


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension: ``(x - mean) * rsqrt(var + eps) * weight + bias``.

    ``var`` is the biased variance. Everything is computed in float32 (or in float64 when given float64,
    which is how tests call it) and only the result is cast to x's dtype, as ``torch.nn.LayerNorm`` does
    on the GPU for 16-bit inputs.

    Args:
        x: (..., hidden) input.
        weight: (hidden,) scale.
        bias: (hidden,) shift, or None.
        eps: added to the variance before the reciprocal square root.

    Returns:
        (..., hidden) tensor of x's dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    centred = xf - xf.mean(-1, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)
