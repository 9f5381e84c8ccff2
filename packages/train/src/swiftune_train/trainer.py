"""swiftune's SFT trainer: TRL's SFTTrainer with the loss computed by the fused linear cross-entropy."""

from __future__ import annotations

import dataclasses

from trl import SFTTrainer as TRLSFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from swiftune_loader.patching import causal_lm_parts, fused_causal_lm_loss
from swiftune_train.trainer_mixin import SwiftuneTrainerMixin


class SFTTrainer(SwiftuneTrainerMixin, TRLSFTTrainer):
    """TRL's ``SFTTrainer`` whose training loss never materializes the full logits.

    The loss goes from the decoder's hidden states and the lm_head weight straight to the cross-entropy, chunk
    by chunk (swiftune_kernels.fused_linear_cross_entropy), and is divided by the number of target tokens over
    all gradient accumulation steps, so that accumulation is exact. :class:`SwiftuneTrainerMixin` adds the
    embedding learning rate and the default callbacks. Everything else is TRL's. Where the fused
    loss cannot apply (an lm_head wrapped by peft, a model that is not a causal LM) or where TRL needs the logits
    (evaluation, label smoothing, a custom ``compute_loss_func``), TRL's own path runs.

    Packed evaluation (``eval_packing=True``) keeps samples apart even when training is not packed: TRL would
    collate the packed eval rows with a full attention mask, letting samples attend to (and predict) each other,
    so the eval loss would depend on the packing; here they are collated padding-free, as packed training is.

    Args:
        fused_loss: set False to always use TRL's loss.
        *args, **kwargs: as for ``trl.SFTTrainer`` (plus ``default_callbacks``, see the mixin).
    """

    def __init__(self, *args, fused_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss and causal_lm_parts(self.model) is not None
        if self.fused_loss:
            # Our loss divides by num_items_in_batch itself; the Trainer must pass it and not rescale the loss.
            self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The fused loss during training; TRL's loss otherwise."""
        usable = (
            self.fused_loss
            and model.training
            and not return_outputs
            and self.compute_loss_func is None
            and self.label_smoother is None
            and getattr(self.args, "loss_type", "nll") == "nll"
            and "labels" in inputs
        )
        if not usable:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = fused_causal_lm_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts the targets of every rank and DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return loss

    def get_eval_dataloader(self, eval_dataset=None):
        """TRL's eval dataloader, collated padding-free when the eval rows are packed (see the class docstring)."""
        collator = self._packed_eval_collator()
        if collator is None:
            return super().get_eval_dataloader(eval_dataset)
        training_collator, self.data_collator = self.data_collator, collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training_collator

    def _packed_eval_collator(self):
        args = self.args
        eval_packing = args.packing if args.eval_packing is None else args.eval_packing
        collator = self.data_collator
        if (
            not eval_packing
            or args.packing_strategy not in ("bfd", "bfd_split")  # "wrapped" rows cut through samples by design
            or type(collator) is not DataCollatorForLanguageModeling
            or collator.padding_free
        ):
            return None
        return dataclasses.replace(collator, padding_free=True)
