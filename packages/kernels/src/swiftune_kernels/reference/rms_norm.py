"""Pure-torch RMSNorm: the oracle, the CPU fallback and the statement of the math of ``rms_norm``."""

from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, casting: str = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dimension: ``x * rsqrt(mean(x^2) + eps) * (offset + weight)``.

    The statistics are computed in float32 (or in float64 when given float64, which is how tests call it).
    ``casting="llama"`` casts the normalised x back to the input dtype before the weight multiplies it, as
    transformers' LlamaRMSNorm does; ``casting="gemma"`` keeps everything, ``offset + weight`` included, in
    float32 and casts only the product, as transformers' GemmaRMSNorm does. The output has x's dtype.

    Args:
        x: (..., hidden) input.
        weight: (hidden,) scale.
        eps: added to the mean square before the reciprocal square root.
        offset: 0 for Llama-style weights, 1 for Gemma-style ``(1 + weight)``.
        casting: "llama" or "gemma".

    Returns:
        (..., hidden) tensor of x's dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama":
        normed = normed.to(x.dtype).to(compute)
    return (normed * (offset + weight.to(compute))).to(x.dtype)
