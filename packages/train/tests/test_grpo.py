"""swiftune's GRPOTrainer: generation in inference mode, TRL's loss from chunked log-probs, a toy reward that rises."""

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer as TRLGRPOTrainer

from swiftune_loader.testing import build_tiny_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer
from swiftune_train.arguments import GRPOConfig
from swiftune_train.grpo import GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["Where is Quillhaven?", "Who founded Quillhaven?", "When was Quillhaven founded?", "Who is the mayor?"]
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Weights 15x the usual init scale: a random tiny model's next-token distribution is then peaked enough for
    # LoRA on the decoder to move it within a few steps (at 0.02 the logits span ~0.1 and barely move).
    return build_tiny_model(tmp_path_factory.mktemp("grpo-llama"), build_chat_tokenizer(), initializer_range=0.3)


@pytest.fixture(scope="module")
def prompts():
    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS] * 4)


def low_half_fraction(completion_ids, **kwargs):
    """Toy reward, a plain callable as TRL takes them: the fraction of completion tokens in the vocabulary's lower
    half (384 tokens)."""
    return [sum(token < 192 for token in ids) / max(len(ids), 1) for ids in completion_ids]


def _trainer(cls, model_dir, tmp_path, data, random_adapter=False, **config):
    settings = dict(
        per_device_train_batch_size=8, num_generations=8, max_completion_length=8, gradient_checkpointing=False,
        save_strategy="no", disable_tqdm=True, seed=0, max_steps=1, warmup_steps=0, lr_scheduler_type="constant",
    )  # fmt: skip
    settings.update(config)
    args = GRPOConfig(str(tmp_path / cls.__module__.replace(".", "_")), **settings)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reward = low_half_fraction
    trainer = cls(model=model, args=args, train_dataset=data, processing_class=tokenizer, reward_funcs=reward)
    if random_adapter:  # the trained adapter leaves the reference (TRL's copy "ref" of the initial adapter)
        generator = torch.Generator().manual_seed(5)
        for name, param in trainer.model.named_parameters():
            if "lora_B.default" in name:
                param.data.normal_(0.0, 0.1, generator=generator)
    return trainer


def _loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_loss_and_logprobs_at_a_temperature_equal_trl(model_dir, tmp_path, prompts):
    config = dict(temperature=0.7, beta=0.2)  # the KL term makes the loss's value depend on the log-probabilities
    trl = _trainer(TRLGRPOTrainer, model_dir, tmp_path, prompts, random_adapter=True, **config)
    ours = _trainer(GRPOTrainer, model_dir, tmp_path, prompts, random_adapter=True, **config)
    trl.model.train()
    inputs = trl._prepare_inputs(next(iter(trl.get_train_dataloader())))  # one generated, scored batch for both
    expected, expected_grads = _loss_and_grads(trl, inputs)
    got, grads = _loss_and_grads(ours, inputs)
    assert ours.chunked_logprobs and ours.chunked_lm_heads[0].calls == 1
    assert ours._metrics["train"]["kl"][0] > 1e-4  # the policy is off the reference
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)

    # The reference (and old-policy) log-probabilities, without gradient, at the sampling temperature.
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].shape[1]
    with torch.no_grad(), ours.model.disable_adapter():
        reference = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, keep)[0]
    assert ours.chunked_lm_heads[0].calls == 2
    torch.testing.assert_close(reference, inputs["ref_per_token_logps"], atol=1e-5, rtol=1e-5)


def test_generation_runs_in_inference_mode_and_training_resumes(model_dir, tmp_path, prompts, torch_kernels):
    trainer = _trainer(GRPOTrainer, model_dir, tmp_path, prompts)
    base = trainer.model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train() does
    decoder = base.model
    assert decoder.gradient_checkpointing
    seen = []
    decoder.register_forward_pre_hook(lambda module, _: seen.append((module.training, module.gradient_checkpointing)))
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (False, False) in seen  # generate() ran in eval mode with checkpointing paused (for_inference)
    assert trainer.model.training and decoder.gradient_checkpointing  # for_training put both back


def test_mean_reward_rises(model_dir, tmp_path, prompts, torch_kernels):
    trainer = _trainer(GRPOTrainer, model_dir, tmp_path, prompts, max_steps=24, learning_rate=5e-2, logging_steps=1)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert len(rewards) == 24 and trainer.chunked_lm_heads[0].calls > 0
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, rewards
    assert all("entropy" not in entry for entry in trainer.state.log_history)  # it needs the logits


def test_a_loss_that_uses_the_entropy_keeps_trl_path(model_dir, tmp_path, prompts):
    trainer = _trainer(GRPOTrainer, model_dir, tmp_path, prompts, top_entropy_quantile=0.5)
    assert not trainer.chunked_logprobs and "entropies" in trainer.chunked_logprobs_off_reason


def test_offloaded_checkpointing_from_the_loader_is_kept_and_not_doubled(model_dir, tmp_path, prompts, torch_kernels):
    # FastLanguageModel's default checkpointing is swiftune's offloaded one; GRPOConfig asks the Trainer for
    # transformers' checkpointing (TRL's default). The trainer must keep ours alone, across generate and train.
    from swiftune_loader import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), use_gradient_checkpointing="offload")
    model = FastLanguageModel.get_peft_model(model, r=8, target_modules=LORA_TARGETS)
    args = GRPOConfig(
        str(tmp_path / "offload"), per_device_train_batch_size=8, num_generations=8, max_completion_length=8,
        save_strategy="no", disable_tqdm=True, seed=0, max_steps=2, warmup_steps=0,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, args=args, train_dataset=prompts, processing_class=tokenizer, reward_funcs=low_half_fraction
    )
    trainer.train()
    base = trainer.model.get_base_model()
    assert base.__dict__.get("_swiftune_offload") is not None  # ours is back on after generation
    assert not getattr(base, "is_gradient_checkpointing", False)  # and transformers' was never added
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 2
