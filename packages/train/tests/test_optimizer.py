"""embedding_learning_rate gives the trained embeddings their own optimizer group; 8-bit AdamW trains on the CPU."""

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer

from swiftune_train import (
    LossCurveCallback,
    NanGuardCallback,
    SFTConfig,
    SFTTrainer,
    SwiftuneTrainerMixin,
    ThroughputCallback,
)


def _rows():
    torch.manual_seed(2)
    rows = []
    for length in (7, 9, 11, 13):
        ids = torch.randint(5, 300, (length,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return datasets.Dataset.from_list(rows)


def _lora_model(model_dir, modules_to_save=("embed_tokens", "lm_head")):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=list(modules_to_save) or None,
        init_lora_weights=False,
    )
    return get_peft_model(base, config)


def _args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_checkpointing=False,
        disable_tqdm=True,
        save_strategy="no",
        seed=3,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def _trainable(model):
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def test_embedding_group_holds_exactly_the_trained_embeddings_with_their_rate(tiny_model_dir, tmp_path):
    model = _lora_model(tiny_model_dir)
    trainer = SFTTrainer(
        model=model, args=_args(tmp_path, embedding_learning_rate=3e-3, weight_decay=0.1), train_dataset=_rows()
    )
    optimizer = trainer.create_optimizer()
    groups = {group.get("name"): group for group in optimizer.param_groups}
    embedding_group = groups.pop("embeddings")
    # peft's trained copies of embed_tokens and lm_head, found here by name rather than by the code under test.
    expected = {id(p) for name, p in _trainable(model).items() if "modules_to_save" in name}
    assert len(expected) == 2
    assert {id(p) for p in embedding_group["params"]} == expected
    assert embedding_group["lr"] == 3e-3 and embedding_group["weight_decay"] == 0.0
    others = [p for group in optimizer.param_groups if group is not embedding_group for p in group["params"]]
    assert {id(p) for p in others} == {id(p) for p in _trainable(model).values()} - expected
    assert all(group["lr"] == 1e-2 for group in optimizer.param_groups if group is not embedding_group)
    assert any(group["weight_decay"] == 0.1 for group in optimizer.param_groups)


def _one_sgd_step(model_dir, tmp_path, embedding_learning_rate):
    model = _lora_model(model_dir)
    before = {name: param.detach().clone() for name, param in _trainable(model).items()}
    args = _args(tmp_path / str(embedding_learning_rate), embedding_learning_rate=embedding_learning_rate)
    SFTTrainer(model=model, args=args, train_dataset=_rows()).train()
    return {name: param.detach() - before[name] for name, param in _trainable(model).items()}


def test_embeddings_move_by_their_own_learning_rate(tiny_model_dir, tmp_path):
    # One SGD step from the same weights on the same batch: every update is -rate * (the same clipped gradient).
    same_rate = _one_sgd_step(tiny_model_dir, tmp_path, embedding_learning_rate=None)  # embeddings at 1e-2
    own_rate = _one_sgd_step(tiny_model_dir, tmp_path, embedding_learning_rate=5e-2)
    for name in same_rate:
        if "modules_to_save" in name:
            assert same_rate[name].abs().max() > 0, name
            torch.testing.assert_close(own_rate[name], same_rate[name] * 5, atol=1e-7, rtol=1e-4, msg=name)
        else:
            torch.testing.assert_close(own_rate[name], same_rate[name], atol=1e-8, rtol=1e-5, msg=name)


def test_embedding_rate_without_trained_embeddings_is_refused(tiny_model_dir, tmp_path):
    model = _lora_model(tiny_model_dir, modules_to_save=())
    trainer = SFTTrainer(model=model, args=_args(tmp_path, embedding_learning_rate=1e-3), train_dataset=_rows())
    with pytest.raises(ValueError, match="modules_to_save"):
        trainer.create_optimizer()


def test_mixin_works_with_a_plain_transformers_trainer(tiny_model_dir, tmp_path):
    class PlainTrainer(SwiftuneTrainerMixin, Trainer):
        pass

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # full fine-tuning, untied embeddings
    trainer = PlainTrainer(model=model, args=_args(tmp_path, embedding_learning_rate=1e-3))
    kinds = [type(callback) for callback in trainer.callback_handler.callbacks]
    assert {NanGuardCallback, ThroughputCallback, LossCurveCallback} <= set(kinds)
    (embedding_group,) = [g for g in trainer.create_optimizer().param_groups if g.get("name") == "embeddings"]
    assert {id(p) for p in embedding_group["params"]} == {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}


def test_eight_bit_adamw_trains_on_the_cpu(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # full fine-tuning: lm_head is big enough for 8 bits
    batch = {"input_ids": torch.tensor([_rows()[3]["input_ids"]])}
    batch["labels"] = batch["input_ids"]
    with torch.no_grad():
        loss_before = model(**batch).loss.item()
    args = _args(tmp_path, optim="adamw_8bit", learning_rate=1e-2, max_steps=4)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_rows())
    trainer.train()
    inner = trainer.optimizer.optimizer
    assert type(inner).__module__.startswith("bitsandbytes.optim"), type(inner)
    assert inner.state[model.lm_head.weight]["state1"].dtype == torch.uint8, "the optimizer state is not 8-bit"
    with torch.no_grad():
        loss_after = model(**batch).loss.item()
    assert loss_after < loss_before - 0.1
