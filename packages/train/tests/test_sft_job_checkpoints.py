"""save_steps writes checkpoints into output_dir, and resume_from_checkpoint continues a run from one."""

import pytest

from swiftune_train import SFTJob, run_sft_job
from swiftune_train.sft_job import resolve_checkpoint


def _job(model_dir, dataset, output_dir, **overrides):
    settings = dict(
        model=str(model_dir),
        dataset=str(dataset),
        output_dir=str(output_dir),
        max_steps=2,
        batch_size=4,
        learning_rate=1e-2,
        lora_r=4,
        lora_alpha=8,
        gradient_checkpointing=False,
        max_seq_length=64,
    )
    settings.update(overrides)
    return SFTJob(**settings)


def _run(job):
    return run_sft_job(job, write=lambda line: None)


def test_save_steps_writes_checkpoints_and_resume_continues_from_the_step(tiny_model_dir, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    first = _run(_job(tiny_model_dir, tiny_dataset, out, max_steps=4, save_steps=2))
    assert [step for step, _ in first.losses] == [1, 2, 3, 4]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        assert (out / name / "adapter_model.safetensors").is_file() and (out / name / "trainer_state.json").is_file()

    resumed = _run(_job(tiny_model_dir, tiny_dataset, out, max_steps=6, resume_from_checkpoint="last"))
    assert [step for step, _ in resumed.losses] == [5, 6]
    from_path = _run(
        _job(
            tiny_model_dir,
            tiny_dataset,
            tmp_path / "other",
            max_steps=6,
            resume_from_checkpoint=str(out / "checkpoint-2"),
        )
    )
    assert [step for step, _ in from_path.losses] == [3, 4, 5, 6]
    # Step 3's loss is computed on the weights and batch of checkpoint-2: the run continued, it did not restart
    # (later steps differ, as the learning-rate schedule now spans 6 steps).
    assert from_path.losses[0][1] == pytest.approx(first.losses[2][1], rel=1e-4)


def test_resume_finds_the_newest_checkpoint_or_says_what_is_missing(tiny_model_dir, tiny_dataset, tmp_path):
    for step in (9, 10, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    for value in (True, "true", "last", "LAST"):
        assert resolve_checkpoint(value, tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint(None, tmp_path) is None and resolve_checkpoint(False, tmp_path) is None
    assert resolve_checkpoint(tmp_path / "checkpoint-2", "elsewhere") == str(tmp_path / "checkpoint-2")

    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="No checkpoint-N folder to resume from"):
        _run(_job(tiny_model_dir, tiny_dataset, empty, resume_from_checkpoint=True))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _run(_job(tiny_model_dir, tiny_dataset, empty, resume_from_checkpoint=str(tmp_path / "missing")))
    assert not empty.exists(), "a failed resume wrote something"
