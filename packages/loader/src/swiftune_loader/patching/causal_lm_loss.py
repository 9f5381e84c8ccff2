"""The causal-LM loss computed from hidden states with swiftune's fused linear cross-entropy: no full logits."""

from __future__ import annotations

import torch

from swiftune_kernels import fused_linear_cross_entropy

IGNORE_INDEX = -100


def causal_lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder and the lm_head of a causal LM (through a peft wrapper), when the fused loss can apply.

    Returns None when it cannot: no decoder/lm_head pair, or an lm_head that peft wraps (LoRA on the lm_head or
    modules_to_save), whose output is not ``hidden @ weight.T``. A DistributedDataParallel (or torch.compile) wrapper
    is looked through.
    """
    model = unwrap_parallel(model)
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    decoder = getattr(base, "model", None)
    lm_head = getattr(base, "lm_head", None)
    if decoder is None or not isinstance(lm_head, torch.nn.Linear) or type(lm_head) is not torch.nn.Linear:
        return None
    return decoder, lm_head


def fused_causal_lm_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``inputs`` without materializing the (tokens, vocab) logits.

    Labels are shifted by one as transformers does: the hidden state at position t predicts the label at t + 1.
    The decoder runs with ``use_cache=False``, as in training (TRL's SFTTrainer sets it too): position ids that
    restart inside a row then mark packed samples, and transformers keeps attention within each of them.
    With ``num_items_in_batch`` (the count of target tokens over all gradient accumulation steps) the summed
    loss is divided by it, so accumulated gradients equal those of one large batch exactly.

    A model wrapped for data parallelism (DistributedDataParallel) or sharded by FSDP2 (``fully_shard`` on the
    model) runs through its own forward, whose hooks synchronize the gradients or gather the sharded weights; see
    :func:`runs_through_own_forward`.

    Args:
        model: a causal LM, or a peft model wrapping one, or either wrapped by DDP or sharded by FSDP2.
        inputs: a batch with ``input_ids`` and ``labels`` (and optionally ``attention_mask``, ``position_ids``).
        num_items_in_batch: the global target-token count, or None to average over this batch's targets.

    Raises:
        ValueError: the model has no plain lm_head (see :func:`causal_lm_parts`).
    """
    parts = causal_lm_parts(model)
    if parts is None:
        raise ValueError("The fused loss needs a causal LM with a plain nn.Linear lm_head.")
    decoder, lm_head = parts
    labels = inputs["labels"]
    decoder_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    decoder_inputs["use_cache"] = False
    if runs_through_own_forward(model):
        hidden, zero = _hidden_through_forward(model, decoder, decoder_inputs)
    else:
        hidden, zero = decoder(**decoder_inputs).last_hidden_state, None
    config = getattr(unwrap_parallel(model), "config", None)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_head.weight,
        targets.reshape(-1),
        lm_head.bias,
        ignore_index=IGNORE_INDEX,
        logit_scale=_logit_scale(config),
        softcap=getattr(config, "final_logit_softcapping", None),
        num_items_in_batch=num_items_in_batch,
    )
    return loss if zero is None else loss + zero


def unwrap_parallel(model):
    """``model`` without its DistributedDataParallel / DataParallel / torch.compile wrappers (FSDP2 adds none)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def runs_through_own_forward(model) -> bool:
    """Whether the loss must call ``model``'s forward rather than its decoder's.

    DistributedDataParallel all-reduces the gradients only of a backward that follows its forward, and an FSDP2
    root gathers its own parameters (embeddings, final norm, lm_head) in its forward: calling the decoder past them
    would train without synchronizing, or fail on sharded weights.
    """
    if model is not unwrap_parallel(model):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return isinstance(model, FSDPModule) or isinstance(base, FSDPModule)


def _hidden_through_forward(model, decoder, decoder_inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden state from a call of ``model``'s forward that computes no logits.

    ``logits_to_keep`` as an empty index makes the lm_head run on zero positions. Also returns the sum of those
    empty logits (exactly 0): added to the loss, it lets the backward pass through the wrapper's output, where
    FSDP2 hooks the backward of its root (gathering its parameters again and reducing their gradients).
    """
    captured = {}

    def keep_output(module, args, output):
        captured["hidden"] = output.last_hidden_state

    handle = decoder.register_forward_hook(keep_output)
    try:
        device = decoder_inputs["input_ids"].device if "input_ids" in decoder_inputs else None
        no_position = torch.empty(0, dtype=torch.long, device=device)
        outputs = model(**decoder_inputs, logits_to_keep=no_position)
    finally:
        handle.remove()
    return captured["hidden"], outputs.logits.sum()


def _logit_scale(config) -> float | None:
    """The factor transformers applies to the logits: Cohere multiplies by ``logit_scale``, Granite divides by
    ``logits_scaling``; None for the others."""
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        return float(scale)
    divisor = getattr(config, "logits_scaling", None)
    return None if divisor in (None, 1, 1.0) else 1.0 / float(divisor)
