"""DDP on 2 CPU processes (gloo) gives the loss curve of 1 process with the doubled batch, with no change to user code.

This file is also the worker program: ``torchrun --nproc-per-node 2 test_distributed_ddp.py MODEL_DIR OUT_DIR BATCH``
trains with a per-process batch of BATCH and writes the logged losses to OUT_DIR/losses.json from rank 0.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

STEPS, PER_PROCESS_BATCH, WORLD_SIZE = 4, 2, 2
# Each logged loss is one global mean over the step's target tokens, computed in float32 in a different order
# (two partial sums and an all-reduce instead of one sum) and after parameters updated by all-reduced gradients:
# each step adds a few float32 roundings (eps ~1.2e-7) relative to the loss; 4 steps stay far below 64 eps.
LOSS_RTOL = 64 * torch.finfo(torch.float32).eps


def training_rows(count: int) -> list[dict]:
    """Rows of different lengths: ranks see different numbers of target tokens, so the global token count matters."""
    generator = torch.Generator().manual_seed(5)
    rows = []
    for i in range(count):
        ids = torch.randint(5, 300, (5 + 3 * (i % 4) + i // 4,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return rows


def train_losses(model_dir, out_dir, per_process_batch: int) -> list[float]:
    """Train a LoRA on the tiny model as a user would (FastLanguageModel + swiftune's SFTTrainer); the logged losses.

    Nothing here knows how many processes run: torchrun's environment decides.
    """
    import datasets
    from transformers import TrainerCallback

    from swiftune_loader import FastLanguageModel
    from swiftune_train import SFTTrainer, sft_config

    losses = []

    class KeepLosses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    # swiftune's default (offloaded) activation checkpointing stays on, as a user would leave it.
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=64, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], random_state=3
    )
    args = sft_config(
        str(out_dir),
        max_steps=STEPS,
        per_device_train_batch_size=per_process_batch,
        learning_rate=5e-2,  # large enough that unsynchronized replicas would part within a step
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        train_sampling_strategy="sequential",  # the same global batches whatever the number of processes
        seed=3,
        report_to=[],
    )
    dataset = datasets.Dataset.from_list(training_rows(STEPS * per_process_batch * WORLD_SIZE))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.add_callback(KeepLosses())
    trainer.train()
    assert trainer.fused_loss
    return losses


def run_torchrun(script: Path, *argv: str, nproc: int = WORLD_SIZE, timeout: int = 300) -> None:
    """Run ``script`` under torchrun on ``nproc`` CPU processes; fail the test with its output if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run(
        [*command, str(script), *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}{result.stderr[-6000:]}"
    )


def test_two_processes_give_the_loss_curve_of_one_process_with_twice_the_batch(tiny_model_dir, tmp_path):
    run_torchrun(Path(__file__), str(tiny_model_dir), str(tmp_path / "ddp"), str(PER_PROCESS_BATCH))
    ddp_losses = json.loads((tmp_path / "ddp" / "losses.json").read_text())

    torch.set_num_threads(1)
    single_losses = train_losses(tiny_model_dir, tmp_path / "single", PER_PROCESS_BATCH * WORLD_SIZE)

    assert len(single_losses) == len(ddp_losses) == STEPS
    # The curve moves (training happens), so equal curves are not equal by accident of a frozen model.
    assert max(single_losses) - min(single_losses) > 100 * LOSS_RTOL * max(single_losses)
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=LOSS_RTOL, atol=0.0)


def _worker(model_dir: str, out_dir: str, per_process_batch: str) -> None:
    from swiftune_train.distributed import is_main_process, process_count

    torch.set_num_threads(1)
    assert process_count() == WORLD_SIZE
    losses = train_losses(model_dir, out_dir, int(per_process_batch))
    if is_main_process():
        Path(out_dir, "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
