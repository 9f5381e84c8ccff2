"""swiftune's KTO trainer: TRL's KTOTrainer with log-probabilities from swiftune's fused linear cross-entropy."""

from __future__ import annotations

from trl import KTOTrainer as TRLKTOTrainer

from swiftune_train.logprobs import ChunkedLogprobsMixin
from swiftune_train.trainer_mixin import SwiftuneTrainerMixin


class KTOTrainer(SwiftuneTrainerMixin, ChunkedLogprobsMixin, TRLKTOTrainer):
    """TRL's ``KTOTrainer`` whose per-token log-probabilities come from :mod:`swiftune_train.logprobs`.

    The completion, KL (mismatched-pair) and reference log-probabilities are computed from the decoder's hidden
    states in chunks; the loss math (``kto``, ``apo_zero_unpaired``, desirable/undesirable weights, the KL
    estimate) is TRL's, unchanged.

    Not logged while the chunked path runs, since they need the whole next-token distribution: ``entropy``,
    ``logits/chosen``, ``logits/rejected``. TRL's own path runs instead (and logs them) with
    ``chunked_logprobs=False``, for MoE router losses, models whose lm_head peft wraps (``modules_to_save``) or that
    scale logits in a way the kernel does not model. Reference log-probabilities precomputed at construction
    (``precompute_ref_log_probs``) come from TRL's path.

    Args:
        chunked_logprobs: set False to keep TRL's log-probabilities.
        *args, **kwargs: as for ``trl.KTOTrainer``, plus ``default_callbacks`` (:class:`SwiftuneTrainerMixin`: the
            embedding learning rate, the NaN guard, throughput and loss-curve callbacks).
    """

    distribution_metrics = ("entropy", "logits/chosen", "logits/rejected")

    def __init__(self, *args, chunked_logprobs: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        blocked_by = None
        if self.aux_loss_enabled:
            blocked_by = "the MoE router auxiliary loss needs the router logits of TRL's forward"
        self._install_chunked_logprobs(chunked_logprobs, temperature=1.0, blocked_by=blocked_by)
