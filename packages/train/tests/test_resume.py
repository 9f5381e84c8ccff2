"""A run killed with SIGKILL resumes from its last checkpoint with the same data order and the same loss curve.

This file is also the child program: ``python test_resume.py MODEL_DIR OUTPUT_DIR RECORD KILL_AT`` trains and
kills itself right after optimizer step KILL_AT (before that step is logged or saved).
"""

import json
import os
import signal
import subprocess
import sys

BATCH, STEPS, SAVE_STEPS, ROWS = 2, 8, 2, 6  # 3 steps an epoch: the run crosses epochs, the kill lands mid-epoch


def run_training(model_dir, output_dir, record_path, kill_at=None, resume=False):
    """Train a LoRA on a tiny model, writing each step's batch and logged loss to ``record_path`` (JSON lines)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from swiftune_train import SFTTrainer, sft_config

    record = open(record_path, "a", buffering=1)  # line-buffered: each line reaches the OS before a SIGKILL

    class RecordingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            pairs = zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
            rows = [ids[mask.bool()].tolist() for ids, mask in pairs]  # without padding
            record.write(json.dumps({"step": self.state.global_step + 1, "rows": rows}) + "\n")
            return super().training_step(model, inputs, *args, **kwargs)

    class RecordAndKill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                record.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")

    generator = torch.Generator().manual_seed(11)
    rows = []
    for i in range(ROWS):
        ids = torch.randint(5, 300, (6 + 2 * i,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    args = sft_config(
        str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=2e-2,
        warmup_steps=2,  # the scheduler's position matters too
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        gradient_checkpointing=False,
        seed=13,
    )
    trainer = RecordingTrainer(
        model=str(model_dir),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        callbacks=[RecordAndKill()],
    )
    trainer.train(resume_from_checkpoint=resume or None)
    record.close()


def _read(path):
    batches, losses = {}, {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "rows" in entry:
            batches.setdefault(entry["step"], []).append(entry["rows"])
        else:
            losses[entry["step"]] = entry["loss"]
    return batches, losses


def test_sigkilled_run_resumes_with_the_same_data_order_and_loss_curve(tiny_model_dir, tmp_path):
    import pytest

    kill_at = 5
    killed_dir, killed_record = tmp_path / "killed", tmp_path / "killed.jsonl"
    child = subprocess.run(
        [sys.executable, __file__, str(tiny_model_dir), str(killed_dir), str(killed_record), str(kill_at)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    killed_batches, killed_losses = _read(killed_record)
    assert sorted(killed_losses) == [1, 2, 3, 4] and sorted(killed_batches) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in killed_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    resumed_record = tmp_path / "resumed.jsonl"
    run_training(tiny_model_dir, killed_dir, resumed_record, resume=True)
    resumed_batches, resumed_losses = _read(resumed_record)
    assert sorted(resumed_losses) == [5, 6, 7, 8]

    whole_record = tmp_path / "whole.jsonl"
    run_training(tiny_model_dir, tmp_path / "whole", whole_record)
    whole_batches, whole_losses = _read(whole_record)
    assert sorted(whole_losses) == list(range(1, STEPS + 1))

    # The same batches at every step, the step at which the run was killed included.
    assert {**killed_batches, **resumed_batches} == whole_batches
    assert killed_batches[kill_at] == resumed_batches[kill_at]

    # The data is shuffled and reshuffled each epoch (so the order really had to be restored): steps 1-3 and
    # steps 4-6 each see every row once, in different orders.
    def epoch(first_step):
        return [row for step in range(first_step, first_step + 3) for row in whole_batches[step][0]]

    assert len(epoch(1)) == ROWS and sorted(epoch(1)) == sorted(epoch(4)) and epoch(1) != epoch(4)
    # The same loss at every step (float noise only: the same operations on the CPU).
    curve = {**killed_losses, **resumed_losses}
    for step in whole_losses:
        assert curve[step] == pytest.approx(whole_losses[step], rel=1e-6, abs=1e-7), step


if __name__ == "__main__":
    model_dir, output_dir, record_path, kill_at = sys.argv[1:5]
    run_training(model_dir, output_dir, record_path, kill_at=int(kill_at))
