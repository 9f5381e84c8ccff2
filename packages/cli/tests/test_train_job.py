"""From settings to the SFTJob: each setting reaches the job or the trainer arguments, or is refused, never dropped."""

import dataclasses
import json

import pytest

import swiftune_train
from swiftune_cli.config_schema import defaults
from swiftune_cli.train_job import build_job, check_dataset_format, resolve_checkpoint


@dataclasses.dataclass
class OlderJob:
    """An SFTJob of an older swiftune-train: few fields, no callbacks."""

    model: str | None = None
    dataset: str | None = None
    output_dir: str = "out"
    lora_r: int = 16
    learning_rate: float = 2e-4
    gradient_checkpointing: bool = True
    probe_questions: list = dataclasses.field(default_factory=list)
    extra_args: dict = dataclasses.field(default_factory=dict)


def test_real_job_takes_every_default_and_the_callbacks_when_it_can(tmp_path):
    config = {
        **defaults(),
        "output_dir": str(tmp_path),
        "lora_r": 4,
        "warmup_steps": 3.0,
        "lr_scheduler_type": "cosine",
    }
    marker = object()
    job = build_job(config, callbacks=[marker])
    fields = {f.name for f in dataclasses.fields(job)}
    assert job.lora_r == 4 and job.output_dir == str(tmp_path)
    for key, value in (("warmup_steps", 3.0), ("lr_scheduler_type", "cosine")):
        assert (getattr(job, key) if key in fields else job.extra_args[key]) == value
    assert job.gradient_checkpointing is False  # no GPU here: the CLI's default
    assert len(job.probe_questions) == 2  # the bundled dataset's held-out questions
    if "callbacks" in fields:
        assert marker in job.callbacks


def test_settings_go_to_the_job_or_to_the_trainer_arguments(monkeypatch):
    monkeypatch.setattr(swiftune_train, "SFTJob", OlderJob)
    config = {**defaults(), "lora_r": 8, "dataset": "d.jsonl", "save_steps": 0, "report_to": ["none"]}
    config.update(learning_rate=1e-3, warmup_steps=5.0, embedding_learning_rate=None, questions=["Q?"])
    job = build_job(config, callbacks=[])
    assert (job.lora_r, job.dataset, job.learning_rate, job.probe_questions) == (8, "d.jsonl", 1e-3, ["Q?"])
    assert job.extra_args["warmup_steps"] == 5.0 and job.extra_args["lr_scheduler_type"] == "linear"
    assert job.extra_args["report_to"] == []  # "none" means no integration
    assert "save_steps" not in job.extra_args  # checkpoints need a job that keeps the trainer's folder


@pytest.mark.parametrize("key,value", [("use_rslora", True), ("target_modules", ["q_proj"]), ("save_steps", 5)])
def test_a_changed_setting_the_job_cannot_apply_is_refused(monkeypatch, key, value):
    monkeypatch.setattr(swiftune_train, "SFTJob", OlderJob)
    with pytest.raises(ValueError, match=f"cannot apply {key}"):
        build_job({**defaults(), key: value}, callbacks=[])


def test_resume_last_finds_the_newest_checkpoint(tmp_path):
    for step in (9, 10, 2):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "checkpoint-final").mkdir()
    assert resolve_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoints" / "checkpoint-10")
    assert resolve_checkpoint(str(tmp_path / "checkpoints" / "checkpoint-2"), "x").endswith("checkpoint-2")
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        resolve_checkpoint("last", str(tmp_path / "checkpoints" / "checkpoint-2"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"), str(tmp_path))


def test_declared_dataset_format_must_match_the_columns(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    check_dataset_format(str(path), "alpaca")
    check_dataset_format(str(path), None)
    with pytest.raises(ValueError, match="needs the columns conversations, but .* has instruction, input, output"):
        check_dataset_format(str(path), "sharegpt")
