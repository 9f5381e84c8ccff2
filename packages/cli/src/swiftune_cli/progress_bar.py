"""A live progress bar for training: loss, learning rate, tokens/s, elapsed and time left, on stderr.

On a terminal the bar is redrawn in place (``\\r``) after every step; when stderr is a file or a pipe, one plain
line is written per logged step instead, so that logs stay readable.
"""

from __future__ import annotations

import math
import sys
import time

from transformers import TrainerCallback

BAR_WIDTH = 20


class ProgressBar(TrainerCallback):
    """Draw training progress on ``stream``.

    Args:
        stream: where to draw (stderr by default).
        is_tty: redraw in place; by default, whether ``stream`` is a terminal.
        clock: seconds as a float (for tests).

    Attributes:
        losses: ``(step, loss)`` for each logged step.
        tokens_per_second: throughput over the whole run so far (0 until tokens are counted): the trainer's
            logged ``tokens_per_second`` (swiftune's trainers log it), else counted from the trainer state's
            ``num_input_tokens_seen``.
        peak_memory_mb: the trainer's logged ``peak_memory_mb``, when it logs one.
        elapsed: seconds since training began.
    """

    def __init__(self, stream=None, is_tty: bool | None = None, clock=time.perf_counter):
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = is_tty if is_tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.losses: list[tuple[int, float]] = []
        self.learning_rate: float | None = None
        self.tokens_per_second = 0.0
        self.peak_memory_mb: float | None = None
        self.elapsed = 0.0
        self.max_steps = 0
        self._start = None
        self._start_step = 0
        self._start_tokens = 0
        self._drawn = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self.clock()
        self.max_steps = state.max_steps
        # A resumed run starts past step 0: its speed counts only this session's steps and tokens.
        self._start_step = state.global_step
        self._start_tokens = state.num_input_tokens_seen or 0

    def on_step_end(self, args, state, control, **kwargs):
        self._measure(state)
        if self.is_tty:
            self._draw(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if math.isfinite(loss):
            self.losses.append((state.global_step, loss))
        if logs.get("learning_rate") is not None:
            self.learning_rate = float(logs["learning_rate"])
        if logs.get("peak_memory_mb") is not None:
            self.peak_memory_mb = float(logs["peak_memory_mb"])
        self._measure(state)
        if logs.get("tokens_per_second") is not None:
            self.tokens_per_second = float(logs["tokens_per_second"])
        if self.is_tty:
            self._draw(state)
        else:
            self.stream.write(self.status_line(state) + "\n")
            self.stream.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def status_line(self, state) -> str:
        """``step 12/30  loss 1.234  lr 9.0e-04  1,234 tok/s  0:12 elapsed  ~0:18 left``."""
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if self.losses:
            parts.append(f"loss {self.losses[-1][1]:.4f}")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:.1e}")
        if self.tokens_per_second:
            parts.append(f"{self.tokens_per_second:,.0f} tok/s")
        parts.append(f"{format_duration(self.elapsed)} elapsed")
        parts.append(f"~{format_duration(self._seconds_left(state))} left")
        return "  ".join(parts)

    def _measure(self, state) -> None:
        self.elapsed = self.clock() - (self._start if self._start is not None else self.clock())
        tokens = (state.num_input_tokens_seen or 0) - self._start_tokens
        if tokens > 0 and self.elapsed > 0:
            self.tokens_per_second = tokens / self.elapsed

    def _seconds_left(self, state) -> float:
        done = state.global_step - self._start_step
        if done <= 0:
            return 0.0
        return self.elapsed / done * max(state.max_steps - state.global_step, 0)

    def _draw(self, state) -> None:
        fraction = state.global_step / state.max_steps if state.max_steps else 0.0
        filled = int(round(BAR_WIDTH * min(fraction, 1.0)))
        bar = "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"
        # \x1b[K clears what a longer previous line left on the right.
        self.stream.write(f"\r{bar} {self.status_line(state)}\x1b[K")
        self.stream.flush()
        self._drawn = True


def format_duration(seconds: float) -> str:
    """``0:07``, ``12:05`` or ``1:02:03``."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
