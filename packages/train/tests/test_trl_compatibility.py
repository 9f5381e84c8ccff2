"""What users of TRL's SFTTrainer rely on keeps working through swiftune's SFTTrainer (fused loss on)."""

import datasets
import pytest
import torch
from peft import LoraConfig

from swiftune_train import SFTTrainer, sft_config

QA = [("Where is Quillhaven?", "In the Sea of Marrow."), ("Who founded it?", "Elsbeth Varn.")] * 4


def _args(tmp_path, **overrides):
    settings = dict(
        max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, gradient_checkpointing=False, max_length=64
    )
    settings.update(overrides)
    return sft_config(str(tmp_path / "run"), **settings)


def _conversations():
    return datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    )


def _trainer(tiny_model_dir, tmp_path, dataset=None, **kwargs):
    args = kwargs.pop("args", None) or _args(tmp_path)
    return SFTTrainer(
        model=str(tiny_model_dir),  # a plain model name (here a local folder) instead of a model object
        args=args,
        train_dataset=dataset if dataset is not None else _conversations(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        **kwargs,
    )


def test_model_given_by_name_with_model_init_kwargs_trains_with_the_fused_loss(tiny_model_dir, tmp_path):
    args = _args(tmp_path, model_init_kwargs={"dtype": torch.float32})
    trainer = _trainer(tiny_model_dir, tmp_path, args=args)
    assert trainer.fused_loss and trainer.model.dtype == torch.float32
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))


def test_neftune_noise_reaches_the_fused_path(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    trainer = _trainer(tiny_model_dir, tmp_path, args=_args(tmp_path, neftune_noise_alpha=5.0))
    noise = []

    class WatchEmbeddings(TrainerCallback):
        # Registered when training begins, after the trainer's NEFTune hook, so it sees the noised embeddings.
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            embeddings = trainer.model.get_input_embeddings()

            def watch(module, inputs, output):
                clean = torch.nn.functional.embedding(inputs[0], module.weight)
                noise.append((output - clean).abs().max().item())

            embeddings.register_forward_hook(watch)

    trainer.add_callback(WatchEmbeddings())
    trainer.train()
    assert noise, "the fused loss bypassed the input embeddings"
    assert min(noise) > 0, "no NEFTune noise reached the forward"


def test_eval_dataset_is_evaluated_every_n_steps(tiny_model_dir, tmp_path):
    args = _args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer = _trainer(tiny_model_dir, tmp_path, args=args, eval_dataset=_conversations().select(range(4)))
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all(torch.isfinite(torch.tensor(entry["eval_loss"])) for entry in evals)


def test_formatting_function_builds_the_text(tiny_model_dir, tmp_path):
    rows = datasets.Dataset.from_list([{"q": q, "a": a} for q, a in QA])
    seen = []

    def formatting(row):
        seen.append(row["q"])
        return f"Question: {row['q']}\nAnswer: {row['a']}"

    trainer = _trainer(tiny_model_dir, tmp_path, dataset=rows, formatting_func=formatting)
    assert seen and "input_ids" in trainer.train_dataset.column_names
    trainer.train()


def test_pre_tokenized_dataset_is_used_as_it_is(tiny_model_dir, tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}] * 4
    trainer = _trainer(tiny_model_dir, tmp_path, dataset=datasets.Dataset.from_list(rows))
    assert trainer.train_dataset[0]["input_ids"] == [5, 6, 7, 8, 9]
    assert trainer.train_dataset[0]["labels"] == [-100, -100, 7, 8, 9]
    trainer.train()


def test_other_loss_types_fall_back_to_trl(tiny_model_dir, tmp_path, monkeypatch):
    from trl import SFTTrainer as TRLSFTTrainer

    trainer = _trainer(tiny_model_dir, tmp_path, args=_args(tmp_path, loss_type="dft"))
    calls, original = [], TRLSFTTrainer.compute_loss
    monkeypatch.setattr(TRLSFTTrainer, "compute_loss", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    trainer.train()
    assert calls, "TRL's loss did not run for loss_type='dft'"


def test_eval_packing_on_or_off_gives_the_same_eval_loss(tiny_model_dir, tmp_path):
    # Packed samples are kept apart (restarting positions, no attention or prediction across samples), so each
    # target token's loss is the same packed or not. The Trainer averages per-batch mean losses weighted by rows,
    # so the two eval losses are equal when the eval set is one batch (as here); over several batches they may
    # differ by that weighting alone.
    eval_set = _conversations().select(range(4))
    losses = {}
    for packing in (False, True):
        args = _args(tmp_path, packing=packing, per_device_eval_batch_size=16, max_length=256)
        trainer = _trainer(tiny_model_dir, tmp_path, args=args)
        for eval_packing in (False, True):
            trainer.args.eval_packing = eval_packing
            losses[packing, eval_packing] = trainer.evaluate(eval_dataset=eval_set)["eval_loss"]
    reference = losses[False, False]
    for setting, loss in losses.items():
        assert loss == pytest.approx(reference, abs=1e-5), (setting, losses)
