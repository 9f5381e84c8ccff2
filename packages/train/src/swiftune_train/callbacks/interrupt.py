"""Ctrl-C during training: finish the current step, save a checkpoint, and stop cleanly."""

from __future__ import annotations

import logging
import signal
import threading

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class InterruptCallback(TrainerCallback):
    """Turns the first SIGINT (Ctrl-C) into "save a checkpoint and stop" at the end of the current optimizer step.

    Without it, Ctrl-C raises KeyboardInterrupt wherever the process happens to be, and every step since the last
    checkpoint is lost. With it, the step in progress completes, a checkpoint is written to
    ``output_dir/checkpoint-N`` (whatever ``save_strategy`` says), and ``trainer.train()`` returns normally, so
    that ``resume_from_checkpoint`` picks up from there. A second SIGINT before the step ends restores the previous
    handler and interrupts at once, for a user who really wants out.

    The handler is installed when training begins (only in the main thread: Python delivers signals there only) and
    the previous one is put back when training ends, or by :meth:`restore` when training fails (swiftune's trainers
    call it in a ``finally``).

    Attributes:
        interrupted_at: the step after which training stopped because of SIGINT, or None.
    """

    def __init__(self):
        self.interrupted_at: int | None = None
        self._requested = False
        self._previous = None
        self._installed = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.interrupted_at = None
        self._requested = False
        if threading.current_thread() is not threading.main_thread() or self._installed:
            return
        self._previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True

    def _on_sigint(self, signum, frame):
        if self._requested:
            # The second Ctrl-C: the user does not want to wait for the step to finish.
            self.restore()
            raise KeyboardInterrupt
        self._requested = True
        logger.warning("Interrupted: saving a checkpoint after this step, then stopping (Ctrl-C again to abort).")

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested and self.interrupted_at is None:
            self.interrupted_at = state.global_step
            control.should_log = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put back the SIGINT handler that was in place before training began (safe to call more than once)."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False
            self._previous = None
