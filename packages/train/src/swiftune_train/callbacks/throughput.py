"""Tokens per second and peak memory, added to the training logs."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping

import torch
from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Adds ``tokens_seen``, ``tokens_per_second`` and ``peak_memory_mb`` to each training log.

    Tokens are the non-padding input tokens of the batches trained since ``train()`` began in this process
    (batches skipped on resume are not counted): swiftune's trainers pass every batch to :meth:`count_batch`.
    With another trainer, the count falls back to transformers' ``num_input_tokens_seen`` (set
    ``include_num_input_tokens_seen``). Peak memory is CUDA's ``max_memory_allocated`` since training began on a
    GPU, the process's peak resident memory on the CPU.

    Args:
        clock: a function returning seconds (tests pass a fake one).
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self._start: float | None = None
        self._counted = 0  # an int or a device tensor: summing on the device avoids a sync per batch
        self._batches_counted = False
        self._state_tokens_at_start = 0

    def count_batch(self, inputs) -> None:
        """Add the non-padding input tokens of one training batch (see :func:`count_input_tokens`)."""
        tokens = count_input_tokens(inputs)
        if tokens is not None:
            self._counted = self._counted + tokens
            self._batches_counted = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self.clock()
        self._counted, self._batches_counted = 0, False
        self._state_tokens_at_start = state.num_input_tokens_seen
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def metrics(self, state) -> dict[str, float]:
        """The throughput and memory values for a log entry now."""
        values = {"peak_memory_mb": round(peak_memory_mb(), 1)}
        if self._batches_counted:
            tokens = int(self._counted)
        else:
            tokens = state.num_input_tokens_seen - self._state_tokens_at_start
        if tokens and self._start is not None:
            elapsed = max(self.clock() - self._start, 1e-9)
            values.update(tokens_seen=tokens, tokens_per_second=round(tokens / elapsed, 1))
        return values

    def on_log(self, args, state, control, logs=None, **kwargs):
        # swiftune's trainers add the values before logging (so that every reporter sees them); with another
        # trainer they are added here, for the callbacks after this one.
        if logs is not None and "loss" in logs and "peak_memory_mb" not in logs:
            logs.update(self.metrics(state))


def count_input_tokens(inputs) -> int | torch.Tensor | None:
    """Non-padding tokens of a batch: the sum of each ``*input_ids`` tensor's 2-D ``*attention_mask``, or all of its
    ids where there is none (padding-free and packed batches); None for a batch without input ids."""
    if not isinstance(inputs, Mapping):
        return None
    total = None
    for key, ids in inputs.items():
        if not key.endswith("input_ids") or not isinstance(ids, torch.Tensor):
            continue
        mask = inputs.get(key[: -len("input_ids")] + "attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
            count = mask.sum()
        else:
            count = ids.numel()
        total = count if total is None else total + count
    return total


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated (MiB) when a GPU is in use, else the process's peak resident memory (MiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
