"""Stop training at the first NaN or inf, before it reaches the weights or a checkpoint."""

from __future__ import annotations

import math
import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint


class NanGuardCallback(TrainerCallback):
    """Raises ``FloatingPointError`` naming the step when the gradients, the loss or the gradient norm is NaN/inf.

    The gradients are checked just before the optimizer step, so the bad update never reaches the weights and no
    checkpoint holding it can be written: the checkpoints already on disk stay, and the message names the last one
    to resume from. The logged loss and gradient norm are checked as well (they catch what the gradient check
    skips: fp16 runs, whose loss scaler skips inf-gradient steps on purpose, and multi-process runs, where only
    the logged values are the same on every process).

    Use ``logging_nan_inf_filter=False`` (swiftune's default) so that a NaN loss is logged as NaN.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or args.fp16 or args.world_size > 1:
            return
        if not gradients_are_finite(model):
            raise FloatingPointError(
                f"Training stopped at step {state.global_step + 1}: the gradients hold NaN or inf, so this step was "
                f"not applied and the weights are those after step {state.global_step}. {_resume_hint(args)}"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if key == "grad_norm" and args.fp16:
                continue  # the fp16 loss scaler produces inf gradient norms on the steps it skips
            if value is not None and not math.isfinite(float(value)):
                raise FloatingPointError(
                    f"Training stopped at step {state.global_step}: the {key.replace('_', ' ')} became {value}, and "
                    f"the weights in memory may hold it (do not save them). {_resume_hint(args)}"
                )


def gradients_are_finite(model: torch.nn.Module) -> bool:
    """True when no parameter gradient of ``model`` holds NaN or inf (one device sync in all)."""
    # A sum is non-finite exactly when an element is NaN/inf (float32 accumulation of finite gradients does not
    # overflow in practice), and summing in float32 needs no float32 copy of a bf16 gradient.
    sums = [p.grad.sum(dtype=torch.float32) for p in model.parameters() if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]).sum()))


def _resume_hint(args) -> str:
    last = get_last_checkpoint(args.output_dir) if args.output_dir and os.path.isdir(args.output_dir) else None
    where = f"The last good checkpoint is {last}" if last else "No checkpoint was saved before it"
    return (
        f"{where}; lower the learning rate or check the data for broken examples, then train again "
        "(resume_from_checkpoint resumes from a checkpoint)."
    )
