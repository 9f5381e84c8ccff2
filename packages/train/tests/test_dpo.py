"""swiftune's DPOTrainer: TRL's loss on the same batch, from chunked log-probabilities; training widens the margin."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOTrainer as TRLDPOTrainer

from swiftune_data import standardize_preference
from swiftune_train.arguments import DPOConfig
from swiftune_train.dpo import DPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def preference_data(preference_table):
    # A plain prompt/chosen/rejected table, standardized to conversations by swiftune's data package.
    return standardize_preference(preference_table)


def _model(model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


def _move_policy_off_reference(model):
    """Randomize the trained adapter (TRL keeps a copy of the initial one, "ref", as the reference)."""
    generator = torch.Generator().manual_seed(5)
    for name, param in model.named_parameters():
        if "lora_B.default" in name:
            param.data.normal_(0.0, 0.2, generator=generator)


def _trainer(cls, model_dir, tmp_path, data, random_adapter=False, **config):
    settings = dict(
        per_device_train_batch_size=4, max_length=64, beta=0.5, gradient_checkpointing=False, save_strategy="no",
        disable_tqdm=True, seed=0, max_steps=1,
    )  # fmt: skip
    settings.update(config)
    args = DPOConfig(str(tmp_path / cls.__module__.replace(".", "_")), **settings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = cls(model=_model(model_dir), args=args, train_dataset=data, processing_class=tokenizer)
    if random_adapter:
        _move_policy_off_reference(trainer.model)
    return trainer


def _loss_and_grads(trainer):
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo", "hinge"]])
def test_loss_and_gradients_equal_trl_on_the_same_batch(tiny_model_dir, tmp_path, preference_data, loss_type):
    trl = _trainer(TRLDPOTrainer, tiny_model_dir, tmp_path, preference_data, random_adapter=True, loss_type=loss_type)
    ours = _trainer(DPOTrainer, tiny_model_dir, tmp_path, preference_data, random_adapter=True, loss_type=loss_type)
    expected, expected_grads = _loss_and_grads(trl)
    got, grads = _loss_and_grads(ours)
    assert trl.state.log_history == [] and abs(float(ours._metrics["train"]["rewards/margins"][0])) > 1e-3
    assert ours.chunked_logprobs and ours.chunked_lm_heads[0].calls == 2  # the policy and the reference
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_training_lowers_the_loss_and_widens_the_margin(tiny_model_dir, tmp_path, preference_data, torch_kernels):
    trainer = _trainer(
        DPOTrainer, tiny_model_dir, tmp_path, preference_data, max_steps=8, learning_rate=2e-2, warmup_steps=0,
        lr_scheduler_type="constant", logging_steps=1,
    )  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 8 and trainer.chunked_lm_heads[0].calls > 0
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.2, [entry["loss"] for entry in logs]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert all("entropy" not in entry and "mean_token_accuracy" not in entry for entry in logs)  # need the logits


def test_wpo_weighting_keeps_trl_path_and_its_metrics(tiny_model_dir, tmp_path, preference_data):
    trainer = _trainer(DPOTrainer, tiny_model_dir, tmp_path, preference_data, use_weighting=True)
    assert not trainer.chunked_logprobs and "use_weighting" in trainer.chunked_logprobs_off_reason
    trainer.train()
    assert "entropy" in trainer.state.log_history[0]
