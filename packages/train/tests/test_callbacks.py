"""The default callbacks: NaN guard, loss-curve PNG, tokens/s and peak memory; reporting only when asked."""

import itertools

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from swiftune_train import LossCurveCallback, NanGuardCallback, SFTTrainer, ThroughputCallback, sft_config
from swiftune_train.callbacks import count_input_tokens

LENGTHS = (3, 5, 8, 13, 4, 6)  # 6 rows of batch 2 in 3 steps: one epoch, every row seen once


def _rows(lengths=LENGTHS):
    torch.manual_seed(4)
    rows = []
    for length in lengths:
        ids = torch.randint(5, 300, (length,)).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return datasets.Dataset.from_list(rows)


def _model(model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _args(output_dir, **overrides):
    settings = dict(
        max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, gradient_checkpointing=False, seed=5
    )
    settings.update(overrides)
    return sft_config(str(output_dir), **settings)


class FakeClock:
    def __init__(self):
        self.now = itertools.count(0.0, 0.5)

    def __call__(self):
        return next(self.now)


def test_tokens_per_second_and_memory_from_non_padding_tokens_and_a_loss_curve_png(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "run"
    throughput = ThroughputCallback(clock=FakeClock())
    trainer = SFTTrainer(
        model=_model(tiny_model_dir),
        args=_args(output_dir, eval_strategy="steps", eval_steps=2),
        train_dataset=_rows(),
        eval_dataset=_rows((4, 7)),
        callbacks=[throughput],
    )
    assert sum(isinstance(c, ThroughputCallback) for c in trainer.callback_handler.callbacks) == 1
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert logs[-1]["tokens_seen"] == sum(LENGTHS)  # padding (batches of unequal rows) is not counted
    for k, entry in enumerate(logs, start=1):
        # The fake clock reads 0 when training begins and advances 0.5 s per later reading (one per log).
        assert entry["tokens_per_second"] == round(entry["tokens_seen"] / (0.5 * k), 1)
        assert entry["peak_memory_mb"] > 0

    png = output_dir / "loss_curve.png"
    data = png.read_bytes()
    assert len(data) > 0 and data[:8] == b"\x89PNG\r\n\x1a\n"
    (curve,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, LossCurveCallback)]
    plotted = {line.get_label(): line.get_xydata().tolist() for line in curve.figure.axes[0].lines}
    history = trainer.state.log_history
    assert plotted == {
        "train loss": [[e["step"], e["loss"]] for e in history if "loss" in e],
        "eval loss": [[e["step"], e["eval_loss"]] for e in history if "eval_loss" in e],
    }
    assert len(plotted["eval loss"]) == 2

    # No reporting was asked for: no integration callback and no event files.
    integrations = tuple(INTEGRATION_TO_CALLBACK.values())
    assert not any(isinstance(c, integrations) for c in trainer.callback_handler.callbacks)
    assert not list(output_dir.rglob("events.out.tfevents*"))


def test_tensorboard_reporting_when_asked(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "run"
    trainer = SFTTrainer(
        model=_model(tiny_model_dir),
        args=_args(output_dir, max_steps=2, report_to=["tensorboard"]),
        train_dataset=_rows(),
    )
    trainer.train()
    events = list((output_dir / "runs").rglob("events.out.tfevents*"))
    assert events and all(path.stat().st_size > 0 for path in events)


class InjectNaN(TrainerCallback):
    """Makes the forward of optimizer step ``bad_step`` produce NaN."""

    def __init__(self, model, bad_step):
        self.bad_step, self.active = bad_step, False
        model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: output * float("nan") if self.active else output
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 == self.bad_step


def test_nan_guard_stops_at_the_bad_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "run"
    model = _model(tiny_model_dir)
    args = _args(output_dir, max_steps=8, save_strategy="steps", save_steps=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_rows(), callbacks=[InjectNaN(model, bad_step=5)])
    with pytest.raises(FloatingPointError, match=r"step 5: the gradients hold NaN.*checkpoint-4"):
        trainer.train()
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    saved = load_file(output_dir / "checkpoint-4" / "adapter_model.safetensors")
    in_memory = get_peft_model_state_dict(model)
    assert saved.keys() == in_memory.keys()
    for name, tensor in saved.items():
        assert torch.isfinite(tensor).all(), name
        # The bad step never reached the weights: they are still those of the checkpoint after step 4.
        torch.testing.assert_close(in_memory[name], tensor, atol=0, rtol=0, msg=name)


class _Args:
    fp16, world_size, output_dir = False, 1, None


class _State:
    global_step = 7


def test_nan_guard_reads_the_logged_loss_and_grad_norm():
    guard = NanGuardCallback()
    with pytest.raises(FloatingPointError, match="step 7: the loss became nan"):
        guard.on_log(_Args(), _State(), None, logs={"loss": float("nan"), "grad_norm": 1.0})
    with pytest.raises(FloatingPointError, match="step 7: the grad norm became inf"):
        guard.on_log(_Args(), _State(), None, logs={"loss": 1.0, "grad_norm": float("inf")})
    fp16 = _Args()
    fp16.fp16 = True  # fp16's loss scaler skips inf-gradient steps by design
    guard.on_log(fp16, _State(), None, logs={"loss": 1.0, "grad_norm": float("inf")})
    guard.on_log(_Args(), _State(), None, logs={"eval_loss": 2.0})


def test_count_input_tokens():
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert count_input_tokens({"input_ids": ids, "attention_mask": mask}) == 8
    assert count_input_tokens({"input_ids": ids, "position_ids": ids}) == 10  # padding-free: no padding
    block_mask = torch.zeros(2, 1, 5, 5)  # a 4-D packed mask says nothing about padding
    assert count_input_tokens({"input_ids": ids, "attention_mask": block_mask}) == 10
    pairs = {"chosen_input_ids": ids, "chosen_attention_mask": mask, "rejected_input_ids": ids[:, :2]}
    assert count_input_tokens(pairs) == 8 + 4
    assert count_input_tokens([{"prompt": "hi"}]) is None
