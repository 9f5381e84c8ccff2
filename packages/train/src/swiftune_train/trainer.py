"""swiftune's SFT trainer: TRL's SFTTrainer with the loss computed by the fused linear cross-entropy."""

from __future__ import annotations

from trl import SFTTrainer as TRLSFTTrainer

from swiftune_loader.patching import causal_lm_parts, fused_causal_lm_loss


class SFTTrainer(TRLSFTTrainer):
    """TRL's ``SFTTrainer`` whose training loss never materializes the full logits.

    The loss goes from the decoder's hidden states and the lm_head weight straight to the cross-entropy, chunk
    by chunk (swiftune_kernels.fused_linear_cross_entropy), and is divided by the number of target tokens over
    all gradient accumulation steps, so that accumulation is exact. Everything else is TRL's. Where the fused
    loss cannot apply (an lm_head wrapped by peft, a model that is not a causal LM) or where TRL needs the logits
    (evaluation, label smoothing, a custom ``compute_loss_func``), TRL's own path runs.

    Args:
        fused_loss: set False to always use TRL's loss.
        *args, **kwargs: as for ``trl.SFTTrainer``.
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
