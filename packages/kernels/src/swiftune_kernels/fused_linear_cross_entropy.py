"""Linear (lm_head) + cross-entropy from hidden states straight to the loss, never holding the (N, V) logits.

Tokens go through in chunks that share one (chunk, V) logits buffer: cuBLAS writes the chunk's logits into it
(``out=``, fp32 accumulation, stored in the inputs' dtype), the cross-entropy kernel of
:mod:`swiftune_kernels.cross_entropy` turns them in place into the logits gradient, and two more matmuls with
``out=`` give grad_hidden[chunk] = grad_logits @ W and grad_W += grad_logits^T @ hidden[chunk]. The weight gradient
accumulates in W's own dtype (cuBLAS adds into it with fp32 accumulation, rounding once per chunk): a float32
accumulator would cost V * H * 4 bytes (2 GiB at 128256 x 4096), eight times the memory budget of the whole op.
All gradients are made in the forward pass; backward scales them by grad_output (skipped where it is 1), except
for reduction "none" with a trainable weight or bias: per-token grad_output weights cannot be applied to a summed
weight gradient after the fact, so backward recomputes the chunks with grad_output as row weights.
"""

from __future__ import annotations

import torch
import triton

from swiftune_kernels.cross_entropy import (
    check_loss_options,
    cross_entropy_backward,
    cross_entropy_forward,
    cross_entropy_weight,
    reduce_loss,
)
from swiftune_kernels.dispatch import check_floating, check_same_device, use_triton
from swiftune_kernels.reference import fused_linear_cross_entropy as reference

# Budget of the shared logits chunk buffer: the op's workspace beyond the gradients it returns stays under 256 MiB
# (4 MiB left for the per-token loss and small buffers). 1024 tokens at V = 128256 and 512 at V = 256000 in bf16
# (~250 MiB): on an H100 chunk 1024 beat 768 by 10% (frozen weight, 8192x4096x128256): the (chunk, H) x (H, V)
# matmuls run closer to peak with the larger M, and there are fewer cross-entropy launches.
DEFAULT_CHUNK_BYTES = 252 * 2**20


def default_chunk_size(n_rows: int, vocab_size: int, element_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk: as many as fit ``chunk_bytes`` of logits, a multiple of 128 (tensor-core tiles) when >= 128."""
    rows = max(1, chunk_bytes // (vocab_size * element_size))
    if rows >= 128:
        rows = rows // 128 * 128
    return max(1, min(rows, n_rows))


def fused_linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    row_weight: torch.Tensor,
    *,
    ignore_index: int = -100,
    logit_scale: float | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    grad_hidden: bool = False,
    grad_weight: bool = False,
    grad_bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-token float32 loss and the asked gradients of sum_i row_weight_i * loss_i (None where not asked)."""
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    # Rows of the logits buffer start on 128-byte boundaries even for vocabularies grown by added tokens (50257,
    # 32001): the kernel's loads vectorize only when the row stride is a multiple of 16 elements, and cuBLAS
    # takes the padded stride as its leading dimension.
    row_stride = triton.cdiv(vocab_size, 64) * 64
    chunk = chunk_size or default_chunk_size(n_rows, row_stride, hidden.element_size())
    chunk = max(1, min(chunk, n_rows))
    compute_grad = grad_hidden or grad_weight or grad_bias
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    logits_buffer = torch.empty(chunk, row_stride, dtype=hidden.dtype, device=device)[:, :vocab_size]
    d_hidden = torch.empty(n_rows, hidden_size, dtype=hidden.dtype, device=device) if grad_hidden else None
    # No zero fill: the first chunk writes grad_W with mm, later chunks add into it.
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device) if grad_weight else None
    d_bias = torch.zeros(vocab_size, dtype=torch.float32, device=device) if grad_bias else None
    weight_t = weight.t()
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        logits = logits_buffer[: end - start]
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        cross_entropy_forward(
            logits,
            targets[start:end],
            row_weight if row_weight.numel() == 1 else row_weight[start:end],
            ignore_index=ignore_index,
            logit_scale=logit_scale,
            softcap=softcap,
            grad=logits if compute_grad else None,
            loss=loss[start:end],
        )
        if d_hidden is not None:
            torch.mm(logits, weight, out=d_hidden[start:end])
        if d_weight is not None:
            if start == 0:
                torch.mm(logits.t(), h, out=d_weight)
            else:
                d_weight.addmm_(logits.t(), h)
        if d_bias is not None:
            # On CUDA a bf16 -> fp32 sum accumulates in fp32 without materializing a float32 copy of the chunk.
            d_bias += logits.sum(0, dtype=torch.float32)
    if d_bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return loss, d_hidden, d_weight, d_bias


def fused_linear_cross_entropy_backward(
    grads: tuple[torch.Tensor | None, ...], grad_output: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """Scale gradients made in forward by grad_output: a scalar, or per token (rows of grad_hidden only)."""
    grad_output = grad_output.to(torch.float32).reshape(-1)
    for grad in grads:
        if grad is not None:
            cross_entropy_backward(grad, grad_output)
    return grads


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd for :func:`fused_linear_cross_entropy`: gradients are made in forward, backward scales them."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        bias,
        ignore_index,
        reduction,
        logit_scale,
        softcap,
        num_items_in_batch,
        chunk_size,
    ):
        needs = ctx.needs_input_grad
        want = dict(grad_hidden=needs[0], grad_weight=needs[1], grad_bias=bias is not None and needs[3])
        options = dict(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size)
        row_weight, denominator = cross_entropy_weight(targets, ignore_index, reduction, num_items_in_batch)
        ctx.recompute = reduction == "none" and (want["grad_weight"] or want["grad_bias"])
        if ctx.recompute:
            loss = fused_linear_cross_entropy_forward(hidden, weight, targets, bias, row_weight, **options)[0]
            ctx.save_for_backward(hidden, weight, targets, bias)
            ctx.options, ctx.want = options, want
        else:
            loss, *grads = fused_linear_cross_entropy_forward(
                hidden, weight, targets, bias, row_weight, **options, **want
            )
            ctx.grads = tuple(grads)
        return reduce_loss(loss, reduction, denominator)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.recompute:
            hidden, weight, targets, bias = ctx.saved_tensors
            row_weight = grad_output.to(torch.float32)
            _, *grads = fused_linear_cross_entropy_forward(
                hidden, weight, targets, bias, row_weight, **ctx.options, **ctx.want
            )
        else:
            grads = ctx.grads
            if grads is None:
                raise RuntimeError(
                    "fused_linear_cross_entropy keeps one set of gradients and scales it in place: it cannot run "
                    "backward twice; call the loss again instead of retain_graph=True."
                )
            ctx.grads = None
            fused_linear_cross_entropy_backward(grads, grad_output)
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None, None


def gather_sharded(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The full tensor behind a DTensor (an lm_head weight sharded by FSDP2), or ``tensor`` itself.

    The gather is differentiable: the gradient of the full tensor is averaged over the ranks and each rank keeps
    its shard (a reduce-scatter), as FSDP does for the gradients of the parameters it shards, so a trained lm_head
    outside FSDP's own unshard still gets the gradient of the global batch. A frozen one costs one all-gather.
    """
    if tensor is None or not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor, Partial  # only where a process group can exist

    if not isinstance(tensor, DTensor):
        return tensor
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against class indices, without materializing the logits.

    Args:
        hidden: (N, H) float32, float16 or bfloat16 hidden states (flatten batch and sequence first).
        weight: (V, H) lm_head weight, same dtype as ``hidden``; frozen (requires_grad False) gets no gradient. A
            DTensor sharded by FSDP2 is gathered first (see :func:`gather_sharded`).
        targets: (N,) int64 class indices in [0, V), or ``ignore_index`` for tokens that do not count.
        bias: Optional (V,) lm_head bias, same dtype as ``hidden``; gathered like ``weight`` when sharded.
        ignore_index: Target value whose tokens get zero loss and zero gradient.
        reduction: "mean" (over non-ignored tokens), "sum", or "none" (per-token losses, 0 on ignored tokens).
        logit_scale: Multiply the logits by this first (Cohere, Granite).
        softcap: Soft-cap the (scaled) logits to ``softcap * tanh(logits / softcap)`` (Gemma 2).
        num_items_in_batch: With reduction "mean", divide the summed loss by this count (an int or a 0-d tensor:
            the number of target tokens over all gradient accumulation steps) instead of by the local count.
        chunk_size: Tokens per chunk; by default as many as fit 252 MiB of logits (1024 at V = 128256 in bf16).

    Returns:
        float32 loss: a scalar, or (N,) for reduction "none".
    """
    weight, bias = gather_sharded(weight), gather_sharded(bias)
    check_floating("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (tokens, hidden), got shape {tuple(hidden.shape)}; flatten with .view.")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must have shape (vocab, {hidden.shape[1]}) to match hidden {tuple(hidden.shape)}, got "
            f"{tuple(weight.shape)}; pass lm_head.weight, not its transpose."
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} is {t.dtype} but hidden is {hidden.dtype}; cast them to one dtype.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk), got {chunk_size!r}.")
    check_loss_options(targets, hidden.shape[0], reduction, logit_scale, softcap, num_items_in_batch)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    options = dict(ignore_index=ignore_index, reduction=reduction, logit_scale=logit_scale, softcap=softcap)
    if not use_triton(hidden):
        return reference.fused_linear_cross_entropy(
            hidden, weight, targets, bias, num_items_in_batch=num_items_in_batch, **options
        )
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, targets, bias, ignore_index, reduction, logit_scale, softcap, num_items_in_batch, chunk_size
    )
