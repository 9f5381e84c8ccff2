"""The fused loss equals transformers' loss, never builds the logits, and makes gradient accumulation exact."""

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from swiftune_loader.patching import fused_causal_lm_loss
from swiftune_train import SFTTrainer, sft_config


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(5, 300, (3, 11))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt that is not trained
    labels[2, 8:] = -100  # right padding of the last row
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_fused_loss_equals_transformers_loss_and_gradients(model):
    batch = _batch()
    reference = model(**batch).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = fused_causal_lm_loss(model, batch)
    fused.backward()
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_num_items_in_batch_divides_the_summed_loss(model):
    batch = _batch()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    mean = fused_causal_lm_loss(model, batch)
    summed_over_more = fused_causal_lm_loss(model, batch, num_items_in_batch=4 * targets)
    torch.testing.assert_close(summed_over_more * 4, mean, atol=1e-6, rtol=1e-6)


def _rows(n=4):
    torch.manual_seed(2)
    rows = []
    for i in range(n):
        length = 7 + 3 * i  # different lengths: batch 4 pads, batch 1 does not
        ids = torch.randint(5, 300, (length,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return datasets.Dataset.from_list(rows)


def _one_step(model_dir, tmp_path, batch_size, accumulation):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    )
    args = sft_config(
        str(tmp_path / f"run{batch_size}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        warmup_steps=0,
        gradient_checkpointing=False,
        lr_scheduler_type="constant",
        seed=7,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=_rows())
    lm_head_calls = []
    base.lm_head.register_forward_hook(lambda *a: lm_head_calls.append(1))
    trainer.train()
    assert trainer.fused_loss and lm_head_calls == [], "training built the full logits"
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_four_accumulated_steps_of_one_equal_one_step_of_four(tiny_model_dir, tmp_path):
    one_of_four = _one_step(tiny_model_dir, tmp_path, batch_size=4, accumulation=1)
    four_of_one = _one_step(tiny_model_dir, tmp_path, batch_size=1, accumulation=4)
    assert one_of_four.keys() == four_of_one.keys()
    for name in one_of_four:
        torch.testing.assert_close(four_of_one[name], one_of_four[name], atol=1e-6, rtol=1e-5, msg=name)
