"""How many decoder layers to checkpoint, given the memory there is: a plan from the config, and its application.

Checkpointing every layer costs a recomputed forward (~25-33% of a step); keeping every layer's activations costs
memory that grows with the tokens in the batch. The plan keeps as many layers un-checkpointed as the budget
allows and recomputes the rest, offloading layer inputs to the host where that keeps one more layer or where even
full recomputation does not fit.

Per token, an un-checkpointed Llama-style layer (swiftune's fused kernels, bf16 autocast) keeps about:
the two norm inputs (residual stream, ``hidden`` each, in the residual dtype), the normed inputs of the fused
q/k/v and MLP projections (``hidden`` each), q, k, v after RoPE and the attention output (q, kv, kv, q widths) for
the attention backward and o_proj, and the MLP's gate and up (``intermediate`` each, the down projection's input
is recomputed from them); the LoRA rank-r intermediates are negligible. A checkpointed layer keeps only its input
(``hidden`` in the residual dtype); an offloaded one keeps nothing on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("none", "recompute", "offload")
# The estimate leaves out small tensors (rstd, logsumexp, masks, rank-r intermediates) and allocator slack.
ESTIMATE_MARGIN = 1.15


@dataclass(frozen=True)
class LayerMemory:
    """Bytes per token that one decoder layer holds on the device until its backward, in each mode."""

    kept: int  # not checkpointed: every activation its backward needs
    checkpointed: int  # recomputed: its input only


def layer_memory(config, compute_bytes: int = 2, residual_bytes: int = 2) -> LayerMemory:
    """Estimate :class:`LayerMemory` from a transformers decoder config (see the module docstring).

    Args:
        config: has hidden_size, intermediate_size, num_attention_heads, num_key_value_heads (head_dim optional).
        compute_bytes: bytes per element of activations under autocast (2 for bf16).
        residual_bytes: bytes per element of the residual stream (4 when the embeddings are float32).
    """
    hidden = int(config.hidden_size)
    inter = int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    kept = 2 * hidden * residual_bytes + compute_bytes * (2 * hidden + 2 * q + 2 * kv + 2 * inter)
    return LayerMemory(kept=math.ceil(kept * ESTIMATE_MARGIN), checkpointed=hidden * residual_bytes)


def plan_checkpointing(
    num_layers: int,
    tokens: int,
    memory: LayerMemory,
    budget_bytes: float,
    can_offload: bool = True,
    host_budget_bytes: float | None = None,
) -> list[str]:
    """The mode of each layer ("none", "recompute" or "offload") so that the activations fit ``budget_bytes``.

    As many layers as fit stay un-checkpointed (the last ones: their backward runs first); the others recompute.
    Offloading a layer's input to the host frees its device bytes at no recompute cost, so inputs are offloaded
    where that lets one more layer stay un-checkpointed, and where even recomputing every layer does not fit; never
    otherwise (the copies cost PCIe traffic for nothing). Offloaded layers are the first ones (they wait longest
    for their backward, so their copies back have the most time). When nothing fits, or with ``can_offload`` False,
    the plan is the best that can be done: as much offloaded as allowed, the rest recomputed.

    Args:
        num_layers: decoder layers.
        tokens: tokens per step (batch x sequence).
        memory: bytes per token per layer, from :func:`layer_memory` or a measurement.
        budget_bytes: device bytes the activations may take (weights, optimizer states and workspaces excluded).
        can_offload: whether offloading is available (CUDA only).
        host_budget_bytes: pinned host bytes the offloaded inputs may take; None: unbounded. Layers the host cannot
            take recompute with their input on the device: a device out-of-memory error is an exception the
            trainer reports, while a host out of memory gets the process killed with nothing saved.

    Returns:
        One mode per layer, in layer order: offloaded, then recomputed, then un-checkpointed layers.
    """
    if not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}.")
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}.")
    if memory.kept < memory.checkpointed or memory.checkpointed < 0:
        raise ValueError(f"a kept layer must hold at least as much as a checkpointed one, got {memory}.")
    kept, ckpt = memory.kept * tokens, memory.checkpointed * tokens
    budget = max(0.0, float(budget_bytes))
    max_offload = num_layers if can_offload and ckpt > 0 else 0
    if host_budget_bytes is not None and ckpt > 0:
        max_offload = min(max_offload, max(0, int(float(host_budget_bytes) // ckpt)))
    for keep in range(num_layers, -1, -1):
        room = budget - keep * kept
        if room < 0:
            continue
        rest = num_layers - keep
        on_device = rest if ckpt == 0 else min(rest, int(room // ckpt))
        offloaded = rest - on_device
        if offloaded <= max_offload:
            return ["offload"] * offloaded + ["recompute"] * on_device + ["none"] * keep
    return ["offload"] * max_offload + ["recompute"] * (num_layers - max_offload)


def step_reserve_bytes(trainable_bytes: int, layer: LayerMemory, tokens: int, loss_bytes_per_token: int) -> int:
    """Device bytes a step needs besides the saved activations: gradients and two AdamW states of the trainable
    parameters (fp32 for each trainable element), one layer's activations during its recompute and backward (twice,
    for the gradients flowing through), and the loss's working set."""
    return int(3 * trainable_bytes + 2 * layer.kept * tokens + loss_bytes_per_token * tokens)


def loss_bytes_per_token(config, chunk_fraction: float = 0.0) -> int:
    """Working bytes per token of the fused linear cross-entropy: the hidden state's gradient (fp32) and, when
    the logits are chunked, nothing that grows with the vocabulary beyond ``chunk_fraction`` of one fp32 row."""
    return int(4 * config.hidden_size + 4 * config.vocab_size * chunk_fraction)
