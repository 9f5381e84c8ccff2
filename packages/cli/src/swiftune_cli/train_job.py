"""From the merged settings of ``swiftune train`` to a ``swiftune_train.SFTJob``.

Each setting goes to the SFTJob field of its name when the installed swiftune-train has one, else to the trainer
arguments (TRL's SFTConfig and swiftune's subclass of it) when it is one of their fields. A setting that neither
takes is refused when it differs from its default, rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from swiftune_cli.config_schema import OPTIONS_BY_KEY

# Settings the CLI resolves itself (defaults that depend on the machine or the dataset).
CLI_SETTINGS = {"dataset_format", "gradient_checkpointing", "questions"}
# Trainer arguments that only make sense when the job keeps the trainer's output folder (checkpoints live there).
JOB_ONLY = {"save_steps", "resume_from_checkpoint"}


def build_job(config: dict, callbacks: list):
    """The SFTJob for ``config`` (the merged, checked settings) with ``callbacks`` attached.

    Raises:
        ValueError: a setting that the installed swiftune-train cannot apply was changed from its default.
    """
    import torch

    from swiftune_train import SFTJob

    job_fields = {f.name for f in dataclasses.fields(SFTJob)}
    trainer_fields = trainer_argument_names()
    kwargs, extra, unsupported = {}, {}, []
    for key, value in config.items():
        if key in CLI_SETTINGS:
            continue
        if key in job_fields:
            kwargs[key] = value
        elif key in trainer_fields and key not in JOB_ONLY:
            extra.update(_trainer_argument(key, value))
        elif value != OPTIONS_BY_KEY[key].default:
            unsupported.append(key)
    if unsupported:
        raise ValueError(
            f"The installed swiftune-train cannot apply {', '.join(unsupported)}; leave "
            f"{'it' if len(unsupported) == 1 else 'them'} at the default or update swiftune-train."
        )
    checkpointing = config["gradient_checkpointing"]
    kwargs["gradient_checkpointing"] = torch.cuda.is_available() if checkpointing is None else checkpointing
    questions = config["questions"]
    kwargs["probe_questions"] = questions if questions is not None else default_questions(config["dataset"])
    if "resume_from_checkpoint" in kwargs:
        kwargs["resume_from_checkpoint"] = resolve_checkpoint(kwargs["resume_from_checkpoint"], config["output_dir"])
    if "callbacks" in job_fields:
        kwargs["callbacks"] = list(callbacks)
    kwargs["extra_args"] = extra
    return SFTJob(**kwargs)


def trainer_argument_names() -> set[str]:
    """Fields of the trainer arguments that swiftune-train builds (TRL's SFTConfig or swiftune's subclass)."""
    import tempfile

    from swiftune_train import sft_config

    with tempfile.TemporaryDirectory(prefix="swiftune-args-") as scratch:
        return {f.name for f in dataclasses.fields(type(sft_config(scratch)))}


def _trainer_argument(key: str, value) -> dict:
    if key == "report_to":
        return {"report_to": [item for item in value if item != "none"]}
    return {key: value}


def default_questions(dataset: str | None) -> list[str]:
    """Two held-out questions of the bundled dataset when training on it; none for the user's own data."""
    if dataset is not None:
        return []
    from swiftune_data import bundled_dataset_path

    with open(bundled_dataset_path("test"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [rows[i]["messages"][0]["content"] for i in (6, 11)]


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """A checkpoint folder; ``last`` names the newest ``checkpoint-N`` under ``output_dir``.

    Raises:
        FileNotFoundError: the folder does not exist, or ``last`` finds no checkpoint.
    """
    if value is None:
        return None
    if value != "last":
        if not Path(value).expanduser().is_dir():
            raise FileNotFoundError(f"Checkpoint folder '{value}' does not exist.")
        return value
    found = [p for p in Path(output_dir).expanduser().glob("**/checkpoint-*") if p.is_dir()]
    numbered = [p for p in found if p.name.removeprefix("checkpoint-").isdigit()]
    if not numbered:
        raise FileNotFoundError(f"resume_from_checkpoint: last found no checkpoint-N folder under '{output_dir}'.")
    return str(max(numbered, key=lambda p: int(p.name.removeprefix("checkpoint-"))))


def check_dataset_format(dataset: str | None, expected: str | None) -> None:
    """Refuse a dataset whose columns are not those of the format the settings declare (``dataset_format``).

    Raises:
        ValueError: the detected format differs from ``expected``.
    """
    if expected is None:
        return
    from swiftune_data import KNOWN_FORMATS, bundled_dataset_path, detect_format, load_dataset_file

    path = dataset if dataset is not None else bundled_dataset_path("train")
    columns = load_dataset_file(path).column_names
    try:
        found = detect_format(columns)
    except ValueError:
        found = None
    if found != expected:
        raise ValueError(
            f"dataset_format is {expected}, which needs the columns {', '.join(KNOWN_FORMATS[expected])}, but "
            f"'{path}' has {', '.join(columns)}" + (f" (a {found} dataset)." if found else ".")
        )
