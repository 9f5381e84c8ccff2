"""From settings to the SFTJob: each setting reaches the job or the trainer arguments, never dropped."""

import dataclasses
import json

import pytest

from swiftune_cli.config_schema import defaults
from swiftune_cli.train_job import CLI_SETTINGS, build_job, check_dataset_format, resolve_checkpoint


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
    assert marker in job.callbacks


def test_every_setting_reaches_the_job_or_the_trainer_arguments(tmp_path):
    changed = {
        "load_in_8bit": True,
        "full_finetuning": True,
        "lora_dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": True,
        "chat_template": "llama-3.1",
        "packing": True,
        "save_steps": 5,
        "resume_from_checkpoint": "last",
        "report_to": ["none", "tensorboard"],
        "warmup_steps": 5.0,
        "lr_scheduler_type": "cosine",
        "questions": ["Q?"],
    }
    job = build_job({**defaults(), "output_dir": str(tmp_path), **changed}, callbacks=[])
    fields = {f.name for f in dataclasses.fields(job)}
    for key, value in changed.items():
        if key == "report_to":
            assert job.report_to == ["tensorboard"]  # "none" means no integration
        elif key == "questions":
            assert job.probe_questions == ["Q?"]
        elif key in fields:
            assert getattr(job, key) == value, key
        else:
            assert job.extra_args[key] == value, key
    # Every key of the schema is used: by the job, the trainer arguments, or the CLI itself.
    taken = fields | set(job.extra_args) | CLI_SETTINGS | {"questions"}
    assert set(defaults()) <= taken, set(defaults()) - taken


def test_a_key_nobody_takes_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="cannot apply no_such_setting"):
        build_job({**defaults(), "no_such_setting": 1}, callbacks=[])


def test_resume_last_finds_the_newest_checkpoint(tmp_path):
    for step in (9, 10, 2):
        (tmp_path / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "checkpoint-final").mkdir()
    assert resolve_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint(str(tmp_path / "checkpoint-2"), "x").endswith("checkpoint-2")
    assert resolve_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="No checkpoint-N folder"):
        resolve_checkpoint("last", str(tmp_path / "checkpoint-2"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"), str(tmp_path))


def test_declared_dataset_format_must_match_the_columns(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    check_dataset_format(str(path), "alpaca")
    check_dataset_format(str(path), None)
    with pytest.raises(ValueError, match="needs the columns conversations, but .* has instruction, input, output"):
        check_dataset_format(str(path), "sharegpt")
