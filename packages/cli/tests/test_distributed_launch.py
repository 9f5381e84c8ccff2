"""``swiftune train --num-gpus N`` relaunches itself under torchrun: the command, the refusals, a real 2-process run."""

import subprocess
import sys

import pytest

from swiftune_cli import distributed_launch
from swiftune_cli.distributed_launch import check_num_gpus, relaunch_with_torchrun, torchrun_command


def test_the_command_runs_swiftune_train_in_n_processes():
    assert torchrun_command(4, ["--model", "m", "--max-steps", "3"]) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
        "swiftune_cli",
        "train",
        "--model",
        "m",
        "--max-steps",
        "3",
    ]


def test_the_exit_status_is_torchrun_s(monkeypatch):
    ran = []

    def fake_run(command, env, check):
        ran.append((command, env))
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(distributed_launch.subprocess, "run", fake_run)
    monkeypatch.setenv(distributed_launch.ALLOW_CPU_ENV, "1")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert relaunch_with_torchrun(2, ["--max-steps", "1"]) == 3
    ((command, env),) = ran
    assert command == torchrun_command(2, ["--max-steps", "1"])
    assert env["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.parametrize(
    ("num_gpus", "cuda_devices", "allow_cpu", "match"),
    [
        (3, 2, False, "more GPUs than the 2 visible"),
        (3, 2, True, "more GPUs than the 2 visible"),  # the CPU switch never overrides real GPUs
        (2, 0, False, "none is visible"),
        (0, 2, False, "positive integer"),
        (True, 2, False, "positive integer"),
    ],
)
def test_impossible_requests_are_refused(num_gpus, cuda_devices, allow_cpu, match):
    with pytest.raises(ValueError, match=match):
        check_num_gpus(num_gpus, cuda_devices, allow_cpu)


def test_possible_requests_pass():
    check_num_gpus(2, 2, False)
    check_num_gpus(2, 0, True)


def test_no_gpu_is_refused_before_anything_starts(monkeypatch):
    monkeypatch.delenv(distributed_launch.ALLOW_CPU_ENV, raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(distributed_launch.subprocess, "run", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(ValueError, match="SWIFTUNE_ALLOW_CPU_DISTRIBUTED=1"):
        relaunch_with_torchrun(2, [])


def test_two_cpu_processes_train_and_rank_zero_writes_the_adapter(tiny_model_dir, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(distributed_launch.ALLOW_CPU_ENV, "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(tiny_dataset), "--output-dir", str(out)]
    argv += ["--max-steps", "2", "--batch-size", "2", "--lora-r", "4", "--max-seq-length", "64"]
    assert relaunch_with_torchrun(2, argv) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
