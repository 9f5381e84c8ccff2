"""swiftune's DPO trainer: TRL's DPOTrainer with log-probabilities from swiftune's fused linear cross-entropy."""

from __future__ import annotations

from trl import DPOTrainer as TRLDPOTrainer

from swiftune_train.logprobs import ChunkedLogprobsMixin
from swiftune_train.trainer_mixin import SwiftuneTrainerMixin


class DPOTrainer(SwiftuneTrainerMixin, ChunkedLogprobsMixin, TRLDPOTrainer):
    """TRL's ``DPOTrainer`` whose per-token log-probabilities come from :mod:`swiftune_train.logprobs`.

    Policy and reference log-probabilities (the reference through the disabled adapter, or a separate reference
    model) are computed from the decoder's hidden states in chunks, with the gradient of the hidden states made in
    the same pass; the loss math (every ``loss_type``, ``ld_alpha``, f-divergences) is TRL's, unchanged.

    Not logged while the chunked path runs, since they need the whole next-token distribution: ``entropy``,
    ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``. TRL's own path runs instead (and logs them)
    with ``chunked_logprobs=False``, for WPO weighting (``use_weighting``), MoE router losses, models whose lm_head
    peft wraps (``modules_to_save``) or that scale logits in a way the kernel does not model. Reference
    log-probabilities precomputed at construction (``precompute_ref_log_probs``) come from TRL's path.

    Args:
        chunked_logprobs: set False to keep TRL's log-probabilities.
        *args, **kwargs: as for ``trl.DPOTrainer``, plus ``default_callbacks`` (:class:`SwiftuneTrainerMixin`: the
            embedding learning rate, the NaN guard, throughput and loss-curve callbacks).
    """

    distribution_metrics = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")

    def __init__(self, *args, chunked_logprobs: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        blocked_by = None
        if self.use_weighting:
            blocked_by = "use_weighting (WPO) needs log(sum p^2) over the vocabulary"
        elif self.aux_loss_enabled:
            blocked_by = "the MoE router auxiliary loss needs the router logits of TRL's forward"
        self._install_chunked_logprobs(chunked_logprobs, temperature=1.0, blocked_by=blocked_by)
