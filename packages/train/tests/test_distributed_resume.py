"""A 2-process DDP run (gloo, CPU) resumed from a checkpoint continues exactly as the uninterrupted 2-process run.

This file is also the worker program:
``torchrun --nproc-per-node 2 test_distributed_resume.py MODEL_DIR ROOT JOB[=CHECKPOINT] ...`` trains one run per JOB
in ROOT/JOB (resuming from CHECKPOINT when given) and writes, from every rank, ROOT/JOB.rank<R>.json: the loss logged
and the rows the rank trained on at each step. Each rank creates files with its own umask (rank 0: 0o022, rank 1:
0o027), so the permission bits of a file tell which rank created it, whichever language (Python, C++, Rust) wrote it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# 12 rows, 2 rows a process, 2 processes: 3 steps an epoch. Resuming from step 2 skips the rest of a shuffled epoch
# and then crosses into a reshuffled one, so the data order has to be restored, not just the weights.
WORLD_SIZE, PER_PROCESS_BATCH, ROWS, STEPS, SAVE_STEPS, RESUME_AT = 2, 2, 12, 6, 2, 2
ADAPTER = "adapter_model.safetensors"


def training_rows() -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    rows = []
    for i in range(ROWS):
        ids = torch.randint(5, 300, (5 + 2 * (i % 5),), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def train(model_dir: str, output_dir: Path, resume_from: str | None) -> dict:
    """Train a LoRA as a user would on every process; what this rank saw (see the module docstring)."""
    import datasets
    from transformers import TrainerCallback

    from swiftune_loader import FastLanguageModel
    from swiftune_train import SFTTrainer, sft_config

    record = {"losses": {}, "rows": {}}

    class RecordingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            pairs = zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
            record["rows"][self.state.global_step + 1] = [ids[mask.bool()].tolist() for ids, mask in pairs]
            return super().training_step(model, inputs, *args, **kwargs)

    class KeepLosses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["losses"][state.global_step] = logs["loss"]

    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], random_state=3
    )
    args = sft_config(
        str(output_dir),
        gradient_checkpointing=False,
        max_steps=STEPS,
        per_device_train_batch_size=PER_PROCESS_BATCH,
        learning_rate=3e-2,
        warmup_steps=2,  # the scheduler's position has to be restored too
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=1,
        seed=3,  # shuffled sampling (the default): the data order depends on the restored sampler state
        report_to=[],
    )
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(training_rows()), processing_class=tokenizer
    )
    trainer.add_callback(KeepLosses())
    trainer.train(resume_from_checkpoint=resume_from)
    return record


def run_torchrun(*argv: str, timeout: int = 300) -> None:
    """Run this file's worker under torchrun on WORLD_SIZE CPU processes; fail the test with its output if it fails.

    (As in test_distributed_ddp.py; the test files are imported in importlib mode and cannot import each other.)
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}"]
    result = subprocess.run(
        [*command, __file__, *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}{result.stderr[-6000:]}"
    )


def _run(tiny_model_dir, root: Path, *jobs: str) -> dict[str, list[dict]]:
    run_torchrun(str(tiny_model_dir), str(root), *jobs)
    names = [job.split("=")[0] for job in jobs]
    return {
        name: [json.loads((root / f"{name}.rank{r}.json").read_text()) for r in range(WORLD_SIZE)] for name in names
    }


def _creators(folder: Path) -> tuple[set[str], set[str], set[str]]:
    """The files directly in ``folder`` created by rank 0, by rank 1, and those created with an explicit mode."""
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir() if path.is_file()}
    by_rank0 = {name for name, mode in modes.items() if mode & 0o044 == 0o044}  # umask 0o022: group+other-read
    by_rank1 = {name for name, mode in modes.items() if mode & 0o044 == 0o040}  # umask 0o027: group-read only
    return by_rank0, by_rank1, set(modes) - by_rank0 - by_rank1


def _steps(records: list[dict], key: str) -> list[int]:
    return sorted(int(step) for step in records[0][key])


def _adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / ADAPTER)


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_two_process_run_resumed_from_a_checkpoint_continues_as_the_uninterrupted_run(tiny_model_dir, tmp_path):
    whole = _run(tiny_model_dir, tmp_path, "whole")["whole"]
    whole_dir = tmp_path / "whole"
    checkpoints = [whole_dir / f"checkpoint-{step}" for step in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS)]
    assert sorted(whole_dir.glob("checkpoint-*")) == sorted(checkpoints)
    assert _steps(whole, "losses") == _steps(whole, "rows") == list(range(1, STEPS + 1))

    # Rank 0 writes the checkpoint; rank 1 writes only its own RNG state (each process has its own random streams).
    for checkpoint in checkpoints:
        by_rank0, by_rank1, unmarked = _creators(checkpoint)
        assert by_rank1 == {"rng_state_1.pth"}, (by_rank0, by_rank1)
        for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "adapter_config.json", "rng_state_0.pth"):
            assert name in by_rank0, (by_rank0, by_rank1)
        # safetensors creates its file with mode 0o600 whatever the umask: it comes from the same rank-0
        # save_pretrained call that wrote adapter_config.json (Trainer.save_model saves only where should_save).
        assert unmarked == {ADAPTER}, unmarked
    assert not _creators(whole_dir)[1], "rank 1 wrote a file in the output folder"

    # The ranks train on different rows, and the shuffled epochs differ: data order is not trivially restored.
    assert whole[0]["rows"]["1"] != whole[1]["rows"]["1"]

    order = [row for step in range(1, STEPS + 1) for rank in whole for row in rank["rows"][str(step)]]
    first_epoch, second_epoch = order[:ROWS], order[ROWS:]
    assert sorted(first_epoch) == sorted(second_epoch) == sorted(row["input_ids"] for row in training_rows())
    assert first_epoch != second_epoch

    # Negative control, in the same torchrun as the real resume: the checkpoint without its optimizer state (the
    # Trainer then starts Adam afresh and says nothing) must part from the uninterrupted run.
    resume_from = checkpoints[RESUME_AT // SAVE_STEPS - 1]
    no_optimizer = tmp_path / "no-optimizer-checkpoint"
    shutil.copytree(resume_from, no_optimizer)
    (no_optimizer / "optimizer.pt").unlink()
    runs = _run(tiny_model_dir, tmp_path, f"resumed={resume_from}", f"lost_optimizer={no_optimizer}")
    resumed, lost_optimizer = runs["resumed"], runs["lost_optimizer"]

    # The resumed run continues at step k+1 (a restart from step 0 would train and log steps 1..k again).
    after = list(range(RESUME_AT + 1, STEPS + 1))
    assert _steps(resumed, "losses") == _steps(resumed, "rows") == after
    for rank in range(WORLD_SIZE):
        # Same rows on each rank at each step: the sampler's position and the shuffling seed were restored.
        assert {s: resumed[rank]["rows"][str(s)] for s in after} == {s: whole[rank]["rows"][str(s)] for s in after}
    # Bitwise equal: the CPU runs the same float32 operations in the same order (1 thread per process, gloo's
    # 2-rank all-reduce, the same batches), starting from bit-exact weights, Adam moments, scheduler and RNG state
    # read back from the checkpoint, so there is no source of difference a tolerance would have to absorb.
    assert [resumed[0]["losses"][str(s)] for s in after] == [whole[0]["losses"][str(s)] for s in after]
    for step in range(RESUME_AT + SAVE_STEPS, STEPS + 1, SAVE_STEPS):
        name = f"checkpoint-{step}"
        assert _bitwise_equal(_adapter(tmp_path / "resumed" / name), _adapter(whole_dir / name)), name
        assert _creators(tmp_path / "resumed" / name)[1] == {"rng_state_1.pth"}

    # The comparison can fail: training moved the adapter after the resume point, and the run that lost its
    # optimizer state (same weights, data, scheduler and RNG) ends elsewhere, with a different loss curve.
    final = f"checkpoint-{STEPS}"
    assert not _bitwise_equal(_adapter(resume_from), _adapter(whole_dir / final))
    assert not _bitwise_equal(_adapter(tmp_path / "lost_optimizer" / final), _adapter(whole_dir / final))
    lost_losses = [lost_optimizer[0]["losses"][str(s)] for s in after[1:]]
    assert all(a != b for a, b in zip(lost_losses, [whole[0]["losses"][str(s)] for s in after[1:]], strict=True))


def _worker(model_dir: str, root: str, *jobs: str) -> None:
    from swiftune_train.distributed import process_count, process_rank

    torch.set_num_threads(1)
    assert process_count() == WORLD_SIZE
    os.umask(0o022 if process_rank() == 0 else 0o027)  # marks the files each rank creates (module docstring)
    for job in jobs:
        name, _, resume_from = job.partition("=")
        record = train(model_dir, Path(root) / name, resume_from or None)
        Path(root, f"{name}.rank{process_rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
