"""A PNG of the training (and evaluation) loss, written to the output folder when training ends."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from transformers import TrainerCallback


def loss_curve_series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """The curves to plot from a Trainer's ``state.log_history``: ``{"train loss": (steps, losses), ...}``.

    Holds ``"train loss"`` (entries with ``loss``) and ``"eval loss"`` (entries with ``eval_loss``) when present.
    """
    series = {}
    for label, key in (("train loss", "loss"), ("eval loss", "eval_loss")):
        entries = [entry for entry in log_history if key in entry and "step" in entry]
        if entries:
            series[label] = ([int(entry["step"]) for entry in entries], [float(entry[key]) for entry in entries])
    return series


def plot_loss_curve(log_history: list[dict], path: str | os.PathLike):
    """Plot the loss curves of ``log_history`` to a PNG at ``path`` (written atomically) and return the figure.

    Uses matplotlib's Agg canvas directly, so no global backend or pyplot state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (steps, losses) in loss_curve_series(log_history).items():
        axes.plot(steps, losses, label=label, marker="o" if label == "eval loss" else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.savefig(stream, format="png")
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return figure


class LossCurveCallback(TrainerCallback):
    """Writes ``loss_curve.png`` (train loss, and eval loss if any) into the output folder when training ends.

    Args:
        path: where to write the PNG; None: ``<output_dir>/loss_curve.png``.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = path
        self.written: Path | None = None
        self.figure = None  # the last figure drawn, for inspection

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not loss_curve_series(state.log_history):
            return
        path = Path(self.path) if self.path is not None else Path(args.output_dir) / "loss_curve.png"
        self.figure = plot_loss_curve(state.log_history, path)
        self.written = path
