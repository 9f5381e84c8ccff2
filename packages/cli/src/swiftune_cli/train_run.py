"""Running the training job of ``swiftune train``: progress bar while it runs, loss curve and summary at the end."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from swiftune_cli.config_schema import check_settings
from swiftune_cli.train_job import build_job, check_dataset_format

LOSS_CURVE_FILE = "loss_curve.png"


def run_training(config: dict) -> int:
    """Train as ``config`` says and print a summary; returns the exit status."""
    check_settings(config)  # before the heavy imports, so that a wrong setting is reported at once
    from swiftune_cli.progress_bar import ProgressBar, format_duration
    from swiftune_train import check_output_dir, run_sft_job

    output_dir = check_output_dir(config["output_dir"])
    check_dataset_format(config["dataset"], config["dataset_format"])
    # Under torchrun every rank runs this; one of them draws and reports, the others train quietly.
    main_process = is_main_process()
    bar = ProgressBar(sys.stderr)
    job = build_job(config, callbacks=[bar] if main_process else [])
    start = time.perf_counter()
    result = run_sft_job(job, write=_job_line if main_process else _quiet)
    seconds = time.perf_counter() - start
    if not main_process:
        return 0

    curve = getattr(result, "loss_curve", None) or output_dir / LOSS_CURVE_FILE  # drawn by swiftune-train
    steps = result.losses[-1][0] if result.losses else 0
    planned = bar.max_steps or steps
    speed = f", {bar.tokens_per_second:,.0f} tokens/s" if bar.tokens_per_second else ""
    print(f"\nfinished at step {steps}/{planned} in {format_duration(seconds)}{speed}")
    peak = bar.peak_memory_mb / 1024 if bar.peak_memory_mb is not None else _peak_memory_gib()
    print(f"peak memory: {peak:.2f} GiB")
    print(f"loss: {result.first_loss:.3f} (first steps) -> {result.last_loss:.3f} (last steps)")
    for question, before, after in zip(job.probe_questions, result.answers_before, result.answers_after, strict=True):
        print(f"\nQ: {question}\n  before: {before}\n  after:  {after}")
    print(f"\nloss curve: {curve if Path(curve).is_file() else 'none written'}")
    print(f"{'model' if job.full_finetuning else 'adapter'} saved to {result.adapter_dir}")
    print(f"next: swiftune export {result.adapter_dir} --out {Path(result.adapter_dir).parent / 'merged'}")
    return 0


def _job_line(line: str) -> None:
    # swiftune-train's own per-step lines are replaced by the progress bar; its other lines say what was loaded.
    if not line.startswith("step "):
        print(line, flush=True)


def _quiet(line: str) -> None:
    pass


def is_main_process() -> bool:
    """Whether this process reports: not a torchrun worker (RANK unset), or its rank 0."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kilobytes on Linux
