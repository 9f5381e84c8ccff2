"""swiftune's KTOTrainer: TRL's loss on the same batch, from chunked log-probabilities; training lowers the loss."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOTrainer as TRLKTOTrainer
from trl.data_utils import unpair_preference_dataset

from swiftune_data import standardize_preference
from swiftune_train.arguments import KTOConfig
from swiftune_train.kto import KTOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unpaired_data(preference_table):
    # Paired preference rows standardized by swiftune's data package, then split into good and bad completions.
    return unpair_preference_dataset(standardize_preference(preference_table))


def _trainer(cls, model_dir, tmp_path, data, random_adapter=False, **config):
    settings = dict(
        per_device_train_batch_size=4, max_length=64, beta=0.5, gradient_checkpointing=False, save_strategy="no",
        disable_tqdm=True, seed=0, max_steps=1, train_sampling_strategy="sequential",
    )  # fmt: skip
    settings.update(config)
    args = KTOConfig(str(tmp_path / cls.__module__.replace(".", "_")), **settings)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainer = cls(model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir))
    if random_adapter:  # the trained adapter leaves the reference (TRL's copy "ref" of the initial adapter)
        generator = torch.Generator().manual_seed(5)
        for name, param in trainer.model.named_parameters():
            if "lora_B.default" in name:
                param.data.normal_(0.0, 0.2, generator=generator)
    return trainer


def _loss_and_grads(trainer):
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_loss_and_gradients_equal_trl_on_the_same_batch(tiny_model_dir, tmp_path, unpaired_data, loss_type):
    trl = _trainer(TRLKTOTrainer, tiny_model_dir, tmp_path, unpaired_data, random_adapter=True, loss_type=loss_type)
    ours = _trainer(KTOTrainer, tiny_model_dir, tmp_path, unpaired_data, random_adapter=True, loss_type=loss_type)
    expected, expected_grads = _loss_and_grads(trl)
    got, grads = _loss_and_grads(ours)
    # kto: the policy's completions and KL pairs, then the reference's (4 calls); apo_zero_unpaired: no KL pairs.
    assert ours.chunked_logprobs and ours.chunked_lm_heads[0].calls == (4 if loss_type == "kto" else 2)
    assert abs(ours._metrics["train"]["rewards/chosen"][0]) > 1e-3  # the policy is off the reference
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_training_lowers_the_loss(tiny_model_dir, tmp_path, unpaired_data, torch_kernels):
    trainer = _trainer(
        KTOTrainer, tiny_model_dir, tmp_path, unpaired_data, max_steps=8, learning_rate=2e-2, warmup_steps=0,
        lr_scheduler_type="constant", logging_steps=1, per_device_train_batch_size=8,
    )  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 8 and trainer.chunked_lm_heads[0].calls > 0
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.05, [entry["loss"] for entry in logs]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert all("entropy" not in entry and "logits/chosen" not in entry for entry in logs)  # they need the logits
