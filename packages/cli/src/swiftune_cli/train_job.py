"""From the merged settings of ``swiftune train`` to a ``swiftune_train.SFTJob``.

Each setting goes to the SFTJob field of its name, else to the trainer arguments (TRL's SFTConfig and swiftune's
subclass of it) through ``SFTJob.extra_args``. A few settings are the CLI's own: they are resolved here (defaults
that depend on the machine or the dataset) or act before the job (``num_gpus``, ``dataset_format``).
"""

from __future__ import annotations

import dataclasses
import json

# Settings the CLI resolves itself (defaults that depend on the machine or the dataset, the launcher).
CLI_SETTINGS = {"dataset_format", "gradient_checkpointing", "questions", "num_gpus"}


def build_job(config: dict, callbacks: list):
    """The SFTJob for ``config`` (the merged, checked settings) with ``callbacks`` attached.

    Raises:
        ValueError: a setting that neither the job nor the trainer arguments know (a schema out of step with the
            installed swiftune-train).
    """
    import torch

    from swiftune_train import SFTJob

    job_fields = {f.name for f in dataclasses.fields(SFTJob)}
    kwargs, extra = {}, {}
    for key, value in config.items():
        if key in CLI_SETTINGS:
            continue
        if key in job_fields:
            kwargs[key] = value
        else:
            extra[key] = value
    unknown = sorted(set(extra) - trainer_argument_names())
    if unknown:
        raise ValueError(
            f"The installed swiftune-train cannot apply {', '.join(unknown)}; update swiftune-train to the version "
            "of swiftune-cli."
        )
    checkpointing = config["gradient_checkpointing"]
    kwargs["gradient_checkpointing"] = torch.cuda.is_available() if checkpointing is None else checkpointing
    questions = config["questions"]
    kwargs["probe_questions"] = questions if questions is not None else default_questions(config["dataset"])
    kwargs["report_to"] = [item for item in config["report_to"] if item != "none"]
    if config["target_modules"] == ["all-linear"]:
        kwargs["target_modules"] = "all-linear"  # peft's keyword, not a layer name
    kwargs["callbacks"] = list(callbacks)
    kwargs["extra_args"] = extra
    return SFTJob(**kwargs)


def trainer_argument_names() -> set[str]:
    """Fields of the trainer arguments that swiftune-train builds (TRL's SFTConfig or swiftune's subclass)."""
    from swiftune_train import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig)}


def default_questions(dataset: str | None) -> list[str]:
    """Two held-out questions of the bundled dataset when training on it; none for the user's own data."""
    if dataset is not None:
        return []
    from swiftune_data import bundled_dataset_path

    with open(bundled_dataset_path("test"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [rows[i]["messages"][0]["content"] for i in (6, 11)]


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder ``resume_from_checkpoint`` names (``last``: the newest ``checkpoint-N`` in
    ``output_dir``), as the job will resolve it; for checking before the job runs.

    Raises:
        FileNotFoundError: the folder does not exist, or ``last`` finds no checkpoint.
    """
    from swiftune_train.sft_job import resolve_checkpoint as resolve

    return resolve(value, output_dir)


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
