"""swiftune's ORPO trainer: TRL's ORPOTrainer (trl.experimental in TRL 1.16) without the full logits."""

from __future__ import annotations

import warnings

import torch
from trl.import_utils import TRLExperimentalWarning

from swiftune_train.logprobs import IGNORE_INDEX, ChunkedLogprobsMixin
from swiftune_train.trainer_mixin import SwiftuneTrainerMixin

with warnings.catch_warnings():
    # TRL 1.16 keeps ORPO in trl.experimental and warns on import; choosing it is this module's purpose.
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer


class ORPOTrainer(SwiftuneTrainerMixin, ChunkedLogprobsMixin, TRLORPOTrainer):
    """TRL's ``ORPOTrainer`` whose forward never builds the (2B, T, V) logits.

    TRL's ORPO runs the model on the concatenated chosen and rejected rows and takes from the full logits both the
    chosen rows' NLL (over prompt and answer) and each row's mean answer log-probability. Here one chunked pass
    (:mod:`swiftune_train.logprobs`) scores every real token, and both come from those per-token log-probabilities;
    the odds-ratio loss and the other metrics are TRL's, unchanged.

    Not logged while the chunked path runs, since they need the logits: ``logits/chosen``, ``logits/rejected``.
    TRL's own path runs instead (and logs them) with ``chunked_logprobs=False``, for encoder-decoder models, MoE
    router losses, models whose lm_head peft wraps (``modules_to_save``) or that scale logits in a way the kernel
    does not model.

    Args:
        chunked_logprobs: set False to keep TRL's forward.
        *args, **kwargs: as for ``trl.experimental.orpo.ORPOTrainer``, plus ``default_callbacks``
            (:class:`SwiftuneTrainerMixin`: the embedding learning rate, the NaN guard, throughput and loss-curve
            callbacks).
    """

    distribution_metrics = ("logits/chosen", "logits/rejected")

    def __init__(self, *args, chunked_logprobs: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        blocked_by = None
        if self.is_encoder_decoder:
            blocked_by = "the model is an encoder-decoder"
        elif self.aux_loss_enabled:
            blocked_by = "the MoE router auxiliary loss needs the router logits of the model's forward"
        self._install_chunked_logprobs(chunked_logprobs, temperature=1.0, blocked_by=blocked_by)

    def concatenated_forward(self, model, batch):
        """TRL's outputs (chosen/rejected mean log-probs, chosen NLL) from one chunked pass; NaN for the logits."""
        if not self.chunked_logprobs:
            return super().concatenated_forward(model, batch)
        concatenated = self.concatenated_inputs(
            batch, is_encoder_decoder=False, padding_value=self.padding_value, device=self.accelerator.device
        )
        input_ids = concatenated["concatenated_input_ids"]
        attention_mask = concatenated["concatenated_attention_mask"]
        answer_labels = concatenated["concatenated_labels"]
        answer = answer_labels != IGNORE_INDEX
        if not torch.equal(answer_labels[answer], input_ids[answer]) or bool((answer & (attention_mask == 0)).any()):
            # Labels that are not the input tokens: score them TRL's way rather than guess.
            return super().concatenated_forward(model, batch)
        # One pass scores every real token: the NLL takes them all (prompt and answer), the preference the answers.
        all_tokens = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        # Through the (possibly DDP-wrapped) model: its forward answers fused_lm_head calls with the chunked path.
        log_probs = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=all_tokens, use_cache=False, fused_lm_head=True
        ).log_probs
        len_chosen = batch["chosen_labels"].shape[0]
        counted = all_tokens[:len_chosen, 1:] != IGNORE_INDEX
        chosen_nll_loss = -log_probs[:len_chosen].sum() / counted.sum()
        answer_mask = answer[:, 1:]
        mean_logps = (log_probs * answer_mask).sum(-1) / answer_mask.sum(-1)
        unknown_logits = torch.full((), float("nan"), device=log_probs.device)
        return mean_logps[:len_chosen], mean_logps[len_chosen:], unknown_logits, unknown_logits, chosen_nll_loss

    def store_metrics(self, metrics: dict[str, float], train_eval: str = "train") -> None:
        """TRL's metric store, without the logits metrics the chunked path leaves unknown."""
        if self._chunked_calls_since_last_check():
            prefix = "eval_" if train_eval == "eval" else ""
            metrics = {k: v for k, v in metrics.items() if k not in {prefix + n for n in self.distribution_metrics}}
        super().store_metrics(metrics, train_eval)
