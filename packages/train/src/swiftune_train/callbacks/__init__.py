"""Trainer callbacks that swiftune's trainers add by default (each also works with any transformers Trainer)."""

from swiftune_train.callbacks.interrupt import InterruptCallback
from swiftune_train.callbacks.loss_curve import LossCurveCallback, loss_curve_series, plot_loss_curve
from swiftune_train.callbacks.nan_guard import NanGuardCallback
from swiftune_train.callbacks.throughput import ThroughputCallback, count_input_tokens, peak_memory_mb

__all__ = [
    "InterruptCallback",
    "LossCurveCallback",
    "NanGuardCallback",
    "ThroughputCallback",
    "count_input_tokens",
    "loss_curve_series",
    "peak_memory_mb",
    "plot_loss_curve",
]
