"""What every swiftune trainer adds to its transformers/TRL base: an embedding learning rate and default callbacks."""

from __future__ import annotations

import logging
import math

import torch

from swiftune_train.callbacks import InterruptCallback, LossCurveCallback, NanGuardCallback, ThroughputCallback

logger = logging.getLogger(__name__)

EMBEDDINGS_GROUP = "embeddings"


class SwiftuneTrainerMixin:
    """Adds swiftune's training extras to a transformers/TRL trainer: ``class T(SwiftuneTrainerMixin, DPOTrainer)``.

    Put it first among the bases.

    - ``args.embedding_learning_rate`` (see :class:`swiftune_train.SwiftuneArguments`) gives the trained input
      embeddings and lm_head their own optimizer group, with that learning rate (following the same schedule) and
      no weight decay.
    - The default callbacks :class:`NanGuardCallback`, :class:`ThroughputCallback`, :class:`LossCurveCallback` and
      :class:`InterruptCallback` (Ctrl-C saves a checkpoint and stops) are added unless the caller passed one of
      the same type (``default_callbacks=False`` adds none).
    - Each training batch is counted for the tokens/s log, and the throughput values are added to every training log
      before any reporter sees it.

    Args:
        default_callbacks: add swiftune's default callbacks.
        *args, **kwargs: as for the trainer it is mixed into.
    """

    def __init__(self, *args, default_callbacks: bool = True, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        check_learning_rates(training_args)
        defer_checkpointing_to_model(model, training_args)
        super().__init__(*args, **kwargs)
        if default_callbacks:
            present = {type(callback) for callback in self.callback_handler.callbacks}
            for callback_type in (NanGuardCallback, ThroughputCallback, LossCurveCallback, InterruptCallback):
                if not any(issubclass(kind, callback_type) for kind in present):
                    self.add_callback(callback_type())

    def train(self, *args, **kwargs):
        """Train as the base trainer does; a failed run still gives SIGINT back to the handler it had before."""
        try:
            return super().train(*args, **kwargs)
        finally:
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, InterruptCallback):
                    callback.restore()

    def _throughput_callbacks(self):
        return [c for c in self.callback_handler.callbacks if isinstance(c, ThroughputCallback)]

    def training_step(self, model, inputs, *args, **kwargs):
        """Count the batch's tokens for the throughput log, then train on it as the base trainer does."""
        for callback in self._throughput_callbacks():
            callback.count_batch(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add tokens/s and peak memory to training logs, then log as the base trainer does."""
        if "loss" in logs:
            for callback in self._throughput_callbacks():
                logs.update(callback.metrics(self.state))
        return super().log(logs, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        """The base trainer's optimizer; the embeddings get their own group when ``embedding_learning_rate`` is set."""
        created_here = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        learning_rate = getattr(self.args, "embedding_learning_rate", None)
        if learning_rate is None:
            return optimizer
        if not created_here:
            logger.warning("embedding_learning_rate is ignored: the trainer was given its own optimizer.")
            return optimizer
        if any(group.get("name") == EMBEDDINGS_GROUP for group in optimizer.param_groups):
            return optimizer
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        split_embedding_group(optimizer, embedding_parameters(model), learning_rate)
        return optimizer


def check_learning_rates(training_args) -> None:
    """Refuse a learning rate that is NaN, infinite or not positive before the model is touched.

    A NaN learning rate turns every weight into NaN at the first step (and no loss check sees it until the step
    after); refusing it here costs nothing and names the setting.

    Raises:
        ValueError: naming the argument and its value.
    """
    if training_args is None:
        return
    for name in ("learning_rate", "embedding_learning_rate"):
        value = getattr(training_args, name, None)
        if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value}; set it to e.g. 2e-4.")


def defer_checkpointing_to_model(model, training_args) -> bool:
    """Switch off the Trainer's own checkpointing when ``model`` already checkpoints (returns whether it did).

    A model from ``FastLanguageModel`` arrives with the checkpointing its user chose (swiftune's offloaded
    checkpointing by default). The Trainer, told ``gradient_checkpointing=True`` (TRL's default), would add
    transformers' checkpointing on top: every layer recomputed twice, and the offloaded wrapper refuses it.
    """
    if model is None or isinstance(model, str) or training_args is None:
        return False
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    offloaded = base.__dict__.get("_swiftune_offload") is not None
    if not offloaded:
        return False
    changed = False
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if getattr(training_args, name, None):
            setattr(training_args, name, False)
            changed = True
    if changed:
        logger.info("The model already uses swiftune's offloaded checkpointing; the Trainer's checkpointing is off.")
    return changed


def embedding_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of the input embeddings and the lm_head (peft's trained copies included).

    peft puts its trained copy (``modules_to_save``), or its adapter, in place of the module, so the module that
    ``get_input_embeddings`` / ``get_output_embeddings`` returns holds the parameters that train.
    """
    modules = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            modules.append(module)
    seen, params = set(), []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:  # tied embeddings are one parameter
                seen.add(id(param))
                params.append(param)
    return params


def split_embedding_group(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], learning_rate: float
) -> None:
    """Move ``params`` out of the optimizer's groups into a new group with ``learning_rate`` and no weight decay.

    Called before the optimizer's first step and before the learning rate scheduler is built, so the scheduler
    scales this group's rate like the others.
    """
    if not params:
        raise ValueError(
            "embedding_learning_rate is set but no input embedding or lm_head parameter is trained; train them "
            '(e.g. peft modules_to_save=["embed_tokens", "lm_head"]) or leave embedding_learning_rate unset.'
        )
    ids = {id(p) for p in params}
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not ids <= grouped:
        raise ValueError(
            "embedding_learning_rate cannot be applied: this optimizer does not hold the embedding parameters in "
            "plain parameter groups (layer-wise or factory optimizers); leave embedding_learning_rate unset."
        )
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.add_param_group(
        {"params": [p for p in params], "lr": learning_rate, "weight_decay": 0.0, "name": EMBEDDINGS_GROUP}
    )
