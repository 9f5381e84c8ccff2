"""swiftune's GRPO trainer: TRL's GRPOTrainer generating through swiftune's inference mode, with chunked log-probs."""

from __future__ import annotations

from trl import GRPOTrainer as TRLGRPOTrainer

from swiftune_loader import FastLanguageModel
from swiftune_train.logprobs import ChunkedLogprobsMixin
from swiftune_train.trainer_mixin import SwiftuneTrainerMixin


class GRPOTrainer(SwiftuneTrainerMixin, ChunkedLogprobsMixin, TRLGRPOTrainer):
    """TRL's ``GRPOTrainer`` that generates in swiftune's inference mode and computes log-probabilities in chunks.

    Rewards are TRL's ``reward_funcs``: plain Python callables ``f(prompts, completions, **columns) -> list[float]``
    (or reward models). Completions are generated with the policy switched by
    :meth:`swiftune_loader.FastLanguageModel.for_inference` (eval mode, KV cache, checkpointing paused) and switched
    back by :meth:`~swiftune_loader.FastLanguageModel.for_training`; vLLM and continuous batching generate as in TRL.
    The policy's, the old policy's and the reference log-probabilities (at the sampling temperature) are computed
    from the decoder's hidden states in chunks; the loss math (every ``loss_type``, clipping, KL, importance
    sampling) is TRL's, unchanged.

    Not logged while the chunked path runs, since it needs the whole next-token distribution: ``entropy``. TRL's
    own path runs instead (and logs it) with ``chunked_logprobs=False``, and whenever the loss itself uses the
    entropy (``top_entropy_quantile`` < 1, an entropy bonus), with ``cast_lm_head_to_fp32``, MoE router losses,
    Gemma-2-style logit soft-capping at a temperature other than 1, models whose lm_head peft wraps, or that scale
    logits in a way the kernel does not model.

    Args:
        chunked_logprobs: set False to keep TRL's log-probabilities.
        *args, **kwargs: as for ``trl.GRPOTrainer``, plus ``default_callbacks`` (:class:`SwiftuneTrainerMixin`: the
            embedding learning rate, the NaN guard, throughput and loss-curve callbacks).
    """

    distribution_metrics = ("entropy",)

    def __init__(self, *args, chunked_logprobs: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        blocked_by = None
        if self.top_entropy_quantile < 1.0 or self._entropy_bonus_enabled:
            blocked_by = "the loss uses the token entropies (top_entropy_quantile < 1 or an entropy bonus)"
        elif self.args.cast_lm_head_to_fp32:
            blocked_by = "cast_lm_head_to_fp32 runs TRL's float32 head"
        elif self.aux_loss_enabled:
            blocked_by = "the MoE router auxiliary loss needs the router logits of TRL's forward"
        self._install_chunked_logprobs(chunked_logprobs, temperature=self.temperature, blocked_by=blocked_by)

    def _generate_single_turn(self, *args, **kwargs):
        """TRL's generation, with the policy in swiftune's inference mode while ``generate`` runs."""
        if self.use_vllm or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(*args, **kwargs)
        was_training = self.model.training
        FastLanguageModel.for_inference(self.model)
        try:
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            # for_training also restores what for_inference paused (checkpointing, use_cache=False).
            FastLanguageModel.for_training(self.model)
            if not was_training:
                self.model.eval()
