"""``swiftune train``: the flags and YAML keys reach the job, --num-gpus relaunches under torchrun, and only rank 0
reports. The training itself is replaced by a recorder (the job's own tests train for real)."""

import sys
import types
from pathlib import Path

import pytest
import yaml

import swiftune_train
from swiftune_cli.main import main
from swiftune_cli.train_command import without_num_gpus


class RecordedJob:
    """Stands in for swiftune_train.run_sft_job: keeps the job and returns a two-step result."""

    def __init__(self):
        self.jobs = []

    def __call__(self, job, write=print):
        self.jobs.append(job)
        write("model tiny (0M parameters)")
        adapter = Path(job.output_dir) / "adapter"
        return swiftune_train.SFTResult(
            adapter, [(1, 2.0), (2, 1.0)], ["a"] * len(job.probe_questions), ["b"] * len(job.probe_questions)
        )


@pytest.fixture
def recorder(monkeypatch):
    recorded = RecordedJob()
    monkeypatch.setattr(swiftune_train, "run_sft_job", recorded)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return recorded


@pytest.fixture
def launcher(monkeypatch):
    """A stand-in for swiftune_cli.distributed_launch (written separately): records each relaunch."""
    calls = []
    module = types.ModuleType("swiftune_cli.distributed_launch")

    def relaunch_with_torchrun(num_gpus, argv):
        calls.append((num_gpus, list(argv)))
        return 0

    module.relaunch_with_torchrun = relaunch_with_torchrun
    monkeypatch.setitem(sys.modules, "swiftune_cli.distributed_launch", module)
    return calls


def test_flags_reach_the_job(recorder, tiny_dataset, tmp_path, capsys):
    argv = [
        "train",
        "--data",
        tiny_dataset,
        "--output-dir",
        tmp_path / "out",
        "--load-in-8bit",
        "--lora-dropout",
        "0.1",
        "--target-modules",
        "q_proj,v_proj",
        "--rslora",
        "--template",
        "zephyr",
        "--packing",
        "--save-steps",
        "3",
        "--resume",
        "--question",
        "Q?",
    ]
    assert main(list(map(str, argv))) == 0
    (job,) = recorder.jobs
    assert (job.load_in_8bit, job.lora_dropout, job.target_modules, job.use_rslora) == (
        True,
        0.1,
        ["q_proj", "v_proj"],
        True,
    )
    assert (job.chat_template, job.packing, job.save_steps, job.resume_from_checkpoint) == ("zephyr", True, 3, "last")
    assert job.probe_questions == ["Q?"] and job.dataset == str(tiny_dataset)
    assert "adapter saved to" in capsys.readouterr().out


def test_yaml_keys_reach_the_job_and_flags_override_them(recorder, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    settings = {
        "output_dir": str(tmp_path / "out"),
        "full_finetuning": True,
        "chat_template": "llama-3.1",
        "save_steps": 10,
        "resume_from_checkpoint": True,  # YAML true: the newest checkpoint
        "use_rslora": True,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
        "packing": True,
        "questions": [],
    }
    config.write_text(yaml.safe_dump(settings))
    assert main(["train", "--config", str(config), "--save-steps", "4"]) == 0
    (job,) = recorder.jobs
    assert job.full_finetuning and job.use_rslora and job.packing
    assert (job.chat_template, job.save_steps, job.resume_from_checkpoint) == ("llama-3.1", 4, "last")
    assert (job.lora_dropout, job.target_modules) == (0.05, "all-linear")
    assert "model saved to" in capsys.readouterr().out  # full fine-tuning saves a model, not an adapter


def test_resume_false_in_yaml_means_start_afresh(recorder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nresume_from_checkpoint: false\nquestions: []\n")
    assert main(["train", "--config", str(config)]) == 0
    assert recorder.jobs[0].resume_from_checkpoint is None


def test_num_gpus_relaunches_under_torchrun_without_the_flag(recorder, launcher, tmp_path):
    out = str(tmp_path / "out")
    assert main(["--debug", "train", "--lr", "1e-3", "--num-gpus", "2", "--output-dir", out]) == 0
    assert launcher == [(2, ["--lr", "1e-3", "--output-dir", out, "--debug"])]
    assert recorder.jobs == [], "the launching process must not train itself"

    config = tmp_path / "run.yaml"
    config.write_text("num_gpus: 4\n")
    assert main(["train", "--config", str(config), "--num-gpus=3"]) == 0
    assert launcher[-1] == (3, ["--config", str(config)])


def test_a_worker_or_one_gpu_trains_in_this_process(recorder, launcher, tmp_path, monkeypatch):
    assert main(["train", "--num-gpus", "1", "--output-dir", str(tmp_path / "a"), "--question", "Q?"]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--num-gpus", "2", "--output-dir", str(tmp_path / "b"), "--question", "Q?"]) == 0
    assert launcher == [] and len(recorder.jobs) == 2


def test_bad_num_gpus_is_refused_before_launching(recorder, launcher, capsys):
    assert main(["train", "--num-gpus", "0"]) == 1
    assert "num_gpus must be a positive integer" in capsys.readouterr().err
    assert launcher == [] and recorder.jobs == []


@pytest.mark.parametrize("rank", [None, "0", "1"])
def test_only_rank_zero_draws_progress_and_prints_the_summary(recorder, tmp_path, monkeypatch, capsys, rank):
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--output-dir", str(tmp_path / "out"), "--question", "Q?"]) == 0
    (job,) = recorder.jobs
    printed = capsys.readouterr().out
    if rank == "1":
        assert job.callbacks == [] and printed == ""
    else:
        assert [type(c).__name__ for c in job.callbacks] == ["ProgressBar"]
        assert "finished at step 2/" in printed and "model tiny" in printed


def test_without_num_gpus():
    assert without_num_gpus(["--num-gpus", "2", "--lr", "1", "--num-gpus=4", "--x"]) == ["--lr", "1", "--x"]
