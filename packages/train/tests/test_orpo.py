"""swiftune's ORPOTrainer: TRL's loss on the same batch without the full logits; training lowers the loss."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from swiftune_data import standardize_preference
from swiftune_train.arguments import ORPOConfig
from swiftune_train.orpo import ORPOTrainer, TRLORPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preference_data(preference_table):
    return standardize_preference(preference_table)


def _trainer(cls, model_dir, tmp_path, data, **config):
    settings = dict(
        per_device_train_batch_size=4, max_length=64, max_completion_length=32, beta=0.5, gradient_checkpointing=False,
        save_strategy="no", disable_tqdm=True, seed=0, max_steps=1,
    )  # fmt: skip
    settings.update(config)
    args = ORPOConfig(str(tmp_path / cls.__module__.replace(".", "_")), **settings)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    return cls(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir))


def _loss_and_grads(trainer):
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_loss_and_gradients_equal_trl_on_the_same_batch(tiny_model_dir, tmp_path, preference_data):
    trl = _trainer(TRLORPOTrainer, tiny_model_dir, tmp_path, preference_data)
    ours = _trainer(ORPOTrainer, tiny_model_dir, tmp_path, preference_data)
    lm_head_calls = []
    ours.model.get_base_model().lm_head.register_forward_hook(lambda *a: lm_head_calls.append(1))
    expected, expected_grads = _loss_and_grads(trl)
    got, grads = _loss_and_grads(ours)
    assert ours.chunked_logprobs and ours.chunked_lm_heads[0].calls == 1 and lm_head_calls == []
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    stored, expected_stored = ours._stored_metrics["train"], trl._stored_metrics["train"]
    assert set(expected_stored) - set(stored) == {"logits/chosen", "logits/rejected"}  # they need the logits
    for name in ("nll_loss", "log_odds_ratio", "rewards/margins"):
        torch.testing.assert_close(stored[name][0], expected_stored[name][0], atol=1e-5, rtol=1e-5, msg=name)


def test_training_lowers_the_loss(tiny_model_dir, tmp_path, preference_data, torch_kernels):
    trainer = _trainer(
        ORPOTrainer, tiny_model_dir, tmp_path, preference_data, max_steps=20, learning_rate=6e-2, warmup_steps=0,
        lr_scheduler_type="constant", logging_steps=1,
    )  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 20 and trainer.chunked_lm_heads[0].calls == 20
    losses = [entry["loss"] for entry in logs]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < losses[0] - 0.2, losses
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert all("logits/chosen" not in entry for entry in logs)
