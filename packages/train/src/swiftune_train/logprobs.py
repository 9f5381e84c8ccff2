"""Per-token log-probabilities from hidden states through swiftune's fused linear cross-entropy: no full logits.

Preference and RL trainers need log p(next token) at every completion position. Here the decoder body runs
without its lm_head, the positions whose label counts are picked out, and
:func:`swiftune_kernels.fused_linear_cross_entropy` (reduction "none") turns them into -log p in chunks (on a GPU;
its CPU fallback is the pure-torch reference, which holds the selected rows' logits). Gradients flow to the hidden
states, and to the lm_head weight when it is trained.

TRL 1.16's DPO, KTO and GRPO trainers ask a model for log-probabilities with ``model(..., labels=labels,
fused_lm_head=True)`` after patching its forward (``trl.trainer.utils.add_fused_lm_head``).
:func:`install_chunked_lm_head` wraps that forward so the same call is answered here; everything it cannot answer
goes to the forward it wrapped, so TRL's own path is the fallback.
"""

from __future__ import annotations

import functools
import logging
import math
import types

import torch
from trl.trainer.utils import FusedCausalLMOutput

from swiftune_kernels import fused_linear_cross_entropy
from swiftune_loader.patching import causal_lm_parts

IGNORE_INDEX = -100
# Fields of TRL's FusedCausalLMOutput that need the whole next-token distribution, which the cross-entropy kernel
# does not return. Our path fills them with NaN (is_top1 with False): the trainers drop the metrics built from them.
DISTRIBUTION_FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Config fields of logit multipliers that only some architectures have; with one of them set, TRL's path runs.
_UNHANDLED_SCALES = ("output_multiplier", "lm_head_multiplier")

logger = logging.getLogger(__name__)


def lm_head_logit_options(config, temperature: float = 1.0) -> tuple[float | None, float | None]:
    """The kernel's ``(logit_scale, softcap)`` for a model's logits divided by ``temperature``.

    transformers scales the logits (Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling``),
    then soft-caps them (Gemma 2); samplers and TRL divide the result by the temperature. The kernel scales, then
    caps, so a temperature folds into the scale only when there is no cap.

    Raises:
        ValueError: the temperature is not positive, or the model both soft-caps and samples at a temperature other
            than 1 (use TRL's path), or its config has a logit multiplier this function does not know.
    """
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    unhandled = [name for name in _UNHANDLED_SCALES if getattr(config, name, None) not in (None, 1, 1.0)]
    if unhandled or getattr(config, "model_type", None) == "hyperclovax":
        raise ValueError(
            f"This model scales its logits with {unhandled or 'logits_scaling'}, which the chunked log-probabilities "
            "do not model; train it with TRL's own trainer."
        )
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale = float(config.logit_scale)
    elif getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None and temperature != 1.0:
        raise ValueError(
            "The model soft-caps its logits before the temperature divides them, which the kernel cannot express; "
            "use temperature=1.0 or TRL's own log-probabilities."
        )
    scale /= temperature
    return (None if scale == 1.0 else scale), softcap


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    *,
    logit_scale: float | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log p(labels[:, t + 1]) from ``hidden[:, t]`` through ``lm_head``, scoring only labels that are not -100.

    Args:
        hidden: (B, T, H) last hidden states of the decoder.
        lm_head: the output projection (a plain ``nn.Linear``).
        labels: (B, T) token ids, -100 where no log-probability is wanted.
        logit_scale, softcap: as for :func:`swiftune_kernels.fused_linear_cross_entropy`.
        chunk_size: tokens per chunk of the kernel (its default fits 252 MiB of logits).

    Returns:
        (B, T - 1) float32 log-probabilities, 0 where the label is -100.
    """
    weight, bias = lm_head.weight, lm_head.bias
    targets = labels[:, 1:].to(weight.device)
    scored = targets != IGNORE_INDEX
    rows = hidden[:, :-1].to(weight.device)[scored]
    dtype = torch.get_autocast_dtype(rows.device.type) if torch.is_autocast_enabled(rows.device.type) else weight.dtype
    # Under autocast TRL computes the projection in the autocast dtype; the kernel needs one dtype for all inputs.
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    nll = fused_linear_cross_entropy(
        rows.to(dtype),
        weight,
        targets[scored],
        bias,
        reduction="none",
        logit_scale=logit_scale,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    # masked_scatter keeps the result connected to the graph even when no label counts (an all-prompt microbatch).
    return nll.new_zeros(scored.shape).masked_scatter(scored, -nll)


def chunked_token_logprobs(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """Per-token log-probabilities of a causal LM's next tokens, computed in chunks from its hidden states.

    Equals ``log_softmax(model(input_ids).logits / temperature)[:, :-1].gather(-1, labels[:, 1:])`` where the label
    counts, without building the (B, T, V) logits; the lm_head runs only at the scored positions.

    Args:
        model: a causal LM or a peft model wrapping one (see :func:`swiftune_loader.patching.causal_lm_parts`).
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        labels: (B, T) the tokens to score, -100 where none is wanted. Defaults to ``input_ids`` where
            ``completion_mask`` (or else ``attention_mask``) is 1.
        completion_mask: (B, T) 1 at the tokens to score, used when ``labels`` is None.
        temperature: divide the logits by this before the softmax (GRPO samples at a temperature).
        chunk_size: tokens per chunk of the kernel.
        **model_kwargs: more decoder inputs (position_ids, inputs_embeds, pixel_values, ...).

    Returns:
        (B, T - 1) float32: entry t is log p(labels[:, t + 1] | tokens up to t), 0 where the label is -100.

    Raises:
        ValueError: the model has no plain lm_head, nothing says which tokens to score, or the temperature cannot
            be applied (see :func:`lm_head_logit_options`).
    """
    parts = causal_lm_parts(model)
    if parts is None:
        raise ValueError(
            "Chunked log-probabilities need a causal LM with a plain nn.Linear lm_head (not one wrapped by peft, "
            "as modules_to_save or LoRA on lm_head make it); use TRL's log-probabilities for this model."
        )
    if labels is None:
        if input_ids is None:
            raise ValueError("Pass labels (the tokens to score) when the model gets inputs_embeds instead of ids.")
        keep = completion_mask if completion_mask is not None else attention_mask
        labels = input_ids if keep is None else input_ids.masked_fill(keep == 0, IGNORE_INDEX)
    logit_scale, softcap = lm_head_logit_options(model.config, temperature)
    decoder, lm_head = parts
    model_kwargs["use_cache"] = False
    if input_ids is not None:
        model_kwargs["input_ids"] = input_ids
    hidden = decoder(attention_mask=attention_mask, **model_kwargs).last_hidden_state
    return token_logprobs_from_hidden(
        hidden, lm_head, labels, logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size
    )


class ChunkedLMHead:
    """The handle of :func:`install_chunked_lm_head`: counts the calls it answered and undoes the wrapping."""

    def __init__(self, model, previous_forward):
        self.model = model
        self._previous = previous_forward
        self.calls = 0  # forward calls answered by the chunked path
        self.fallbacks = 0  # fused_lm_head calls handed to the wrapped forward

    def revert(self) -> None:
        """Give the model back the forward it had before :func:`install_chunked_lm_head`."""
        if self._previous is None:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self._previous


def chunked_lm_head_blocker(model, temperature: float = 1.0) -> str | None:
    """Why :func:`install_chunked_lm_head` cannot serve ``model`` at ``temperature``, or None when it can."""
    if causal_lm_parts(model) is None:
        return "the model has no plain nn.Linear lm_head (peft wraps it, or it is not a causal LM)"
    from torch.distributed.tensor import DTensor

    if isinstance(causal_lm_parts(model)[1].weight, DTensor):
        return "the lm_head weight is sharded (FSDP2 DTensor), and TRL's head gathers it"
    try:
        lm_head_logit_options(model.config, temperature)
    except ValueError as error:
        return str(error)
    return None


def install_chunked_lm_head(model, temperature: float = 1.0) -> ChunkedLMHead:
    """Answer ``model(..., labels=labels, fused_lm_head=True)`` with :func:`chunked_token_logprobs`.

    The calls TRL's fused LM head serves (``trl.trainer.utils.add_fused_lm_head``) return the same
    ``FusedCausalLMOutput``: ``log_probs`` (B, T - 1), ``label_mask`` and ``loss`` as TRL computes them, and NaN
    (False for ``is_top1``) in the fields that need the whole distribution (:data:`DISTRIBUTION_FIELDS`). Calls
    with positional inputs, pre-shifted ``shift_labels`` (context parallelism) or MoE router logits go to the
    forward this wraps, as do all calls without ``fused_lm_head`` (generation, plain forwards).

    Args:
        model: the transformers model (not its peft wrapper) whose forward TRL patched.
        temperature: the temperature TRL's head divides the logits by.

    Returns:
        A :class:`ChunkedLMHead` handle.

    Raises:
        ValueError: :func:`chunked_lm_head_blocker` names a reason the model cannot be served.
    """
    reason = chunked_lm_head_blocker(model, temperature)
    if reason is not None:
        raise ValueError(f"Cannot compute this model's log-probabilities in chunks: {reason}.")
    handle = ChunkedLMHead(model, model.__dict__.get("forward"))
    wrapped = model.forward
    text_config = model.config.get_text_config()

    # Keep the class forward's signature: generate() checks its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        routed = kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False)
        if not fused_lm_head or args or labels is None or shift_labels is not None or routed:
            passed = dict(fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels)
            passed["num_items_in_batch"] = num_items_in_batch
            kwargs.update({k: v for k, v in passed.items() if v is not None and v is not False})
            handle.fallbacks += bool(fused_lm_head)
            return wrapped(*args, **kwargs)
        handle.calls += 1
        log_probs = chunked_token_logprobs(self, labels=labels, temperature=temperature, **kwargs)
        label_mask = labels[:, 1:].to(log_probs.device) != IGNORE_INDEX
        count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        unknown = torch.full_like(log_probs, float("nan"), requires_grad=False)
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=unknown,
            log_sum_sq_probs=unknown,
            mean_logits=unknown,
            is_top1=torch.zeros_like(label_mask),
            label_mask=label_mask,
        )

    model.forward = types.MethodType(forward, model)
    return handle


class ChunkedLogprobsMixin:
    """Trainer mixin: serve a TRL trainer's ``fused_lm_head`` calls with :func:`install_chunked_lm_head`.

    The subclass calls :meth:`_install_chunked_logprobs` at the end of its ``__init__`` and names in
    ``distribution_metrics`` the metrics TRL builds from :data:`DISTRIBUTION_FIELDS`: those are not logged for the
    logging periods in which the chunked path answered.
    """

    distribution_metrics: tuple[str, ...] = ()

    def _install_chunked_logprobs(self, enabled: bool, temperature: float = 1.0, blocked_by: str | None = None):
        """Wrap the policy's and the reference model's heads, or record why TRL's path stays.

        Sets ``chunked_logprobs`` (whether the chunked path is on) and ``chunked_logprobs_off_reason``.
        """
        models = [self.model] + ([self.ref_model] if getattr(self, "ref_model", None) is not None else [])
        bases = [self.accelerator.unwrap_model(m) for m in models]
        bases = [m.get_base_model() if callable(getattr(m, "get_base_model", None)) else m for m in bases]
        reason = "chunked_logprobs=False was passed" if not enabled else blocked_by
        for base in bases:
            reason = reason or chunked_lm_head_blocker(base, temperature)
        self.chunked_lm_heads = [] if reason else [install_chunked_lm_head(base, temperature) for base in bases]
        self.chunked_logprobs = not reason
        self.chunked_logprobs_off_reason = reason
        self._chunked_calls_logged = 0
        if reason:
            logger.info("%s computes log-probabilities with TRL's path: %s.", type(self).__name__, reason)

    def _chunked_calls_since_last_check(self) -> int:
        total = sum(head.calls for head in getattr(self, "chunked_lm_heads", []))
        since, self._chunked_calls_logged = total - self._chunked_calls_logged, total
        return since

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log, without the distribution metrics that the chunked path left unknown."""
        if self._chunked_calls_since_last_check():
            for metrics in getattr(self, "_metrics", {}).values():
                for name in self.distribution_metrics:
                    metrics.pop(name, None)
        super().log(logs, start_time)
