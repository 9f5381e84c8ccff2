"""Pure-torch cross-entropy over a vocabulary: the oracle and CPU fallback of ``swiftune_kernels.cross_entropy``.

Math, per row i with target t_i (rows whose target is ``ignore_index`` contribute 0 loss and 0 gradient):

    y = logits * logit_scale                      (when logit_scale is given: Cohere, Granite)
    c = softcap * tanh(y / softcap)               (when softcap is given: Gemma 2)
    loss_i = logsumexp(c_i) - c_i[t_i]

reduction "none" returns loss_i, "sum" returns sum_i loss_i, "mean" returns sum_i loss_i divided by the number of
non-ignored rows, or by ``num_items_in_batch`` when given (the target count across all gradient accumulation steps).
Half-precision logits are computed in float32 (like the kernel); float64 stays float64; the loss is float32 or float64.
"""

from __future__ import annotations

import torch


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float | None = None,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference cross-entropy; see :func:`swiftune_kernels.cross_entropy` for the arguments."""
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    c = logits.to(compute_dtype)
    if logit_scale is not None:
        c = c * logit_scale
    if softcap is not None:
        c = softcap * torch.tanh(c / softcap)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    target_logit = c.gather(1, safe_targets[:, None])[:, 0]
    loss = torch.where(valid, torch.logsumexp(c, dim=1) - target_logit, torch.zeros_like(target_logit))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        return total / valid.sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch.to(device=total.device, dtype=total.dtype)
    return total / num_items_in_batch
