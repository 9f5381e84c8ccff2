"""A progress callback that prints one short line per logged step, so the loss can be watched going down."""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback


class ProgressPrinter(TrainerCallback):
    """Prints ``step 12/60  loss 1.234  lr 1.8e-04  2.1 s/step  ~1m40s left  1520 tok/s  peak 812 MB`` and keeps
    the loss history (the last two when the trainer logs ``tokens_per_second`` / ``peak_memory_mb``, as
    swiftune's trainers do).

    Args:
        write: where lines go (``print`` by default).
    """

    def __init__(self, write=print):
        self.write = write
        self.losses: list[tuple[int, float]] = []
        self.non_finite_loss: float | None = None
        self._start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        grad_norm = float(logs.get("grad_norm", 0.0))
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            loss = loss if not math.isfinite(loss) else grad_norm
            self.non_finite_loss = loss
            control.should_training_stop = True
            return
        self.losses.append((state.global_step, loss))
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        per_step = elapsed / max(state.global_step, 1)
        left = per_step * max(state.max_steps - state.global_step, 0)
        lr = logs.get("learning_rate")
        lr_text = f"  lr {lr:.1e}" if lr is not None else ""
        tokens = logs.get("tokens_per_second")
        tokens_text = f"  {tokens:.0f} tok/s" if tokens is not None else ""
        memory = logs.get("peak_memory_mb")
        memory_text = f"  peak {memory:.0f} MB" if memory is not None else ""
        self.write(
            f"step {state.global_step}/{state.max_steps}  loss {loss:.4f}{lr_text}  {per_step:.2f} s/step  "
            f"~{_duration(left)} left{tokens_text}{memory_text}"
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
