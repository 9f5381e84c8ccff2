"""Faults during training: Ctrl-C (SIGINT), a NaN in the loss, and SIGKILL followed by a resume.

Running out of disk during export is proven in packages/export/tests/test_out_of_space.py (see docs/RELIABILITY.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal

import pytest
from support import RESUME_TEST
from transformers import TrainerCallback


def _rows(count=8):
    import datasets
    import torch

    generator = torch.Generator().manual_seed(3)
    rows = []
    for i in range(count):
        ids = torch.randint(5, 300, (5 + i,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return datasets.Dataset.from_list(rows)


def _trainer(model_dir, output_dir, callbacks, **overrides):
    from peft import LoraConfig

    from swiftune_train import SFTTrainer, sft_config

    settings = dict(max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2, gradient_checkpointing=False)
    settings.update(overrides)
    return SFTTrainer(
        model=str(model_dir),
        args=sft_config(str(output_dir), seed=7, **settings),
        train_dataset=_rows(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        callbacks=callbacks,
    )


class SigintAt(TrainerCallback):
    """Sends this process SIGINT at the end of optimizer step ``step``, as a user's Ctrl-C would arrive."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class NanLossAt(TrainerCallback):
    """Makes the input embeddings' output NaN in micro-batch ``micro`` (1-based) of optimizer step ``step``, so that
    the loss of that micro-batch is NaN."""

    def __init__(self, step, micro=1):
        self.step, self.micro, self.current, self.seen, self.hooked = step, micro, 0, 0, False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.hooked:
            model.get_input_embeddings().register_forward_hook(self._hook)
            self.hooked = True

    def on_step_begin(self, args, state, control, **kwargs):
        self.current, self.seen = state.global_step + 1, 0

    def _hook(self, module, inputs, output):
        import torch

        if not torch.is_grad_enabled():  # generation and evaluation are not training micro-batches
            return output
        self.seen += 1
        return output * float("nan") if (self.current, self.seen) == (self.step, self.micro) else output


def test_sigint_through_the_trainer_saves_a_checkpoint_stops_and_restores_the_handler(assets, tmp_path):
    from safetensors.torch import load_file

    from swiftune_train.callbacks import InterruptCallback

    before = signal.getsignal(signal.SIGINT)
    output_dir = tmp_path / "run"
    trainer = _trainer(assets.model, output_dir, [SigintAt(3)])
    result = trainer.train()  # returns: the interrupt is not an exception
    interrupt = next(c for c in trainer.callback_handler.callbacks if isinstance(c, InterruptCallback))
    assert interrupt.interrupted_at == 3 and result.global_step == 3
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    checkpoint = output_dir / "checkpoint-3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3
    assert load_file(checkpoint / "adapter_model.safetensors")
    assert signal.getsignal(signal.SIGINT) is before

    # The checkpoint resumes to the planned end.
    resumed = _trainer(assets.model, output_dir, [])
    assert resumed.train(resume_from_checkpoint=str(checkpoint)).global_step == 8


def test_second_sigint_aborts_at_once_and_the_handler_is_restored(assets, tmp_path):
    class TwoSigints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    trainer = _trainer(assets.model, tmp_path / "run", [TwoSigints()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is before
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_sigint_through_sft_job_keeps_a_checkpoint_in_output_dir(assets, tmp_path):
    from swiftune_train import SFTJob, run_sft_job

    job = SFTJob(
        model=str(assets.model),
        dataset=str(assets.dataset),
        output_dir=str(tmp_path / "out"),
        max_steps=20,
        batch_size=2,
        max_seq_length=64,
        gradient_checkpointing=False,
        callbacks=[SigintAt(2)],
    )
    run_sft_job(job, write=lambda line: None)
    assert list((tmp_path / "out").rglob("checkpoint-2/adapter_model.safetensors"))


def test_sigint_during_swiftune_train_saves_a_checkpoint_and_exits_cleanly(background):
    """The command, started at the session's beginning (support.background_runs), gets SIGINT once its progress
    shows a training step."""
    run = background["sigint"]
    result = run.finish()
    stderr = result["stderr"]
    assert result["interrupted"], f"training never started:\n{stderr[-3000:]}"
    assert result["rc"] == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert list(run.output_dir.rglob("checkpoint-*/adapter_model.safetensors")), stderr[-3000:]


@pytest.mark.parametrize("micro", [1, 2], ids=["first-micro-batch", "second-micro-batch"])
def test_nan_in_the_loss_stops_the_run_and_keeps_the_last_good_checkpoint(assets, tmp_path, micro):
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    output_dir = tmp_path / "run"
    trainer = _trainer(
        assets.model,
        output_dir,
        [NanLossAt(step=4, micro=micro)],
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        save_strategy="steps",
        save_steps=1,
    )
    with pytest.raises(FloatingPointError, match=r"step 4: .*NaN.*checkpoint-3"):
        trainer.train()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    saved = load_file(output_dir / "checkpoint-3" / "adapter_model.safetensors")
    in_memory = get_peft_model_state_dict(trainer.model)
    for name, tensor in saved.items():
        assert torch.isfinite(tensor).all(), name
        torch.testing.assert_close(in_memory[name].cpu(), tensor, atol=0, rtol=0, msg=name)


def test_nan_through_sft_job_raises_and_saves_no_adapter(assets, tmp_path):
    from swiftune_train import SFTJob, run_sft_job

    job = SFTJob(
        model=str(assets.model),
        dataset=str(assets.dataset),
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        batch_size=2,
        max_seq_length=64,
        gradient_checkpointing=False,
        callbacks=[NanLossAt(step=2)],
    )
    with pytest.raises(FloatingPointError, match="step 2"):
        run_sft_job(job, write=lambda line: None)
    assert not (tmp_path / "out" / "adapter").exists()


def _resume_module():
    spec = importlib.util.spec_from_file_location("swiftune_train_test_resume", RESUME_TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigkill_at_a_random_step_then_resume_gives_the_same_adapter_bitwise(background, assets, tmp_path):
    """packages/train/tests/test_resume.py proves the same data order and loss curve after a SIGKILL at step 5;
    this kills its child at a random step (support.sigkill_step) and compares the final adapter bit for bit."""
    import torch
    from safetensors.torch import load_file

    resume = _resume_module()
    run = background["sigkill"]
    where = f"seed {run.seed}, killed after step {run.kill_at}"
    child = run.finish()
    assert child["rc"] == -signal.SIGKILL, f"{where}:\n{child['stderr'][-3000:]}"
    resume.run_training(assets.model, run.output_dir, tmp_path / "r.jsonl", resume=True)
    resume.run_training(assets.model, tmp_path / "whole", tmp_path / "w.jsonl")

    final = f"checkpoint-{resume.STEPS}"
    resumed = load_file(run.output_dir / final / "adapter_model.safetensors")
    whole = load_file(tmp_path / "whole" / final / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys()
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), f"{name} differs ({where})"
