"""Pure-torch linear + cross-entropy: the oracle and CPU fallback of ``swiftune_kernels.fused_linear_cross_entropy``.

logits = hidden @ weight.T (+ bias), computed in the inputs' dtype (like the chunked cuBLAS matmul of the fused op),
then the reference cross-entropy (float32 math for half-precision logits). Unlike the fused op this materializes the
whole (N, V) logits: it is the oracle and the CPU fallback, not the fast path.
"""

from __future__ import annotations

import torch

from swiftune_kernels.reference.cross_entropy import cross_entropy


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float | None = None,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference linear + cross-entropy; see :func:`swiftune_kernels.fused_linear_cross_entropy` for the arguments."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy(
        logits,
        targets,
        ignore_index=ignore_index,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=softcap,
        num_items_in_batch=num_items_in_batch,
    )
