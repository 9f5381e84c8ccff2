"""FSDP2 on 2 CPU processes (gloo): a tiny LoRA model sharded by fsdp2_wrap trains as one process with the doubled
batch does, and the adapter gathered on rank 0 reloads on one process with the same logits.

This file is also the worker program: ``torchrun --nproc-per-node 2 test_distributed_fsdp.py MODEL_DIR OUT_DIR``
trains the sharded model, then writes OUT_DIR/adapter, OUT_DIR/losses.json and OUT_DIR/logits.pt from rank 0.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, PER_PROCESS_BATCH, WORLD_SIZE, LENGTH = 3, 2, 2, 9
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], random_state=3)
# Float32 results of the same math summed in another order (sharded all-gathers, averaged gradients): a few
# roundings (eps ~1.2e-7) per step relative to values of order 1, far below 64 eps after 3 steps.
RTOL = 64 * torch.finfo(torch.float32).eps


def global_batches() -> list[dict]:
    """STEPS batches of WORLD_SIZE * PER_PROCESS_BATCH rows of one length (the mean over ranks is the global mean)."""
    generator = torch.Generator().manual_seed(9)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(5, 300, (WORLD_SIZE * PER_PROCESS_BATCH, LENGTH), generator=generator)
        labels = ids.clone()
        labels[:, :3] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def probe_ids() -> torch.Tensor:
    return torch.randint(5, 300, (2, 7), generator=torch.Generator().manual_seed(4))


def lora_model(model_dir):
    from swiftune_loader import FastLanguageModel

    # max_seq_length within the model's 256 positions: no RoPE scaling, so plain transformers reloads the same model.
    model, _ = FastLanguageModel.from_pretrained(
        str(model_dir), max_seq_length=64, dtype=torch.float32, use_gradient_checkpointing=False
    )
    return FastLanguageModel.get_peft_model(model, **LORA)


def train(model, batches: list[dict], average) -> list[float]:
    """SGD steps with swiftune's fused loss; ``average`` turns this process's loss into the global one (for logs)."""
    from swiftune_loader.patching import fused_causal_lm_loss

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    losses = []
    for batch in batches:
        loss = fused_causal_lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(average(loss.detach()))
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


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    run_torchrun(Path(__file__), str(tiny_model_dir), str(out_dir))
    return out_dir


def test_sharded_training_follows_one_process_with_twice_the_batch(fsdp_run, tiny_model_dir):
    torch.set_num_threads(1)
    fsdp_losses = json.loads((fsdp_run / "losses.json").read_text())
    single_losses = train(lora_model(tiny_model_dir), global_batches(), average=float)
    assert len(fsdp_losses) == STEPS
    assert max(single_losses) - min(single_losses) > 100 * RTOL * max(single_losses), "the model did not train"
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(single_losses), rtol=RTOL, atol=0.0)


def test_gathered_adapter_reloads_on_one_process_with_the_same_logits(fsdp_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(probe_ids()).logits
        reloaded = PeftModel.from_pretrained(base, fsdp_run / "adapter").eval()
        logits = reloaded(probe_ids()).logits
    sharded_logits = torch.load(fsdp_run / "logits.pt", weights_only=True)
    assert (fsdp_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (logits - base_logits).abs().max() > 1e-2, "the saved adapter does not change the model"
    torch.testing.assert_close(logits, sharded_logits, rtol=RTOL, atol=RTOL)


def _worker(model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from swiftune_train.distributed import fsdp2_wrap, is_main_process, process_rank, save_sharded_adapter

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        model = fsdp2_wrap(lora_model(model_dir))
        assert isinstance(model, FSDPModule)
        lm_head = model.get_base_model().lm_head
        assert type(lm_head.weight).__name__ == "DTensor", "the lm_head must be sharded for this test to mean much"
        rank, rows = process_rank(), slice(process_rank() * PER_PROCESS_BATCH, (process_rank() + 1) * PER_PROCESS_BATCH)
        batches = [{key: value[rows] for key, value in batch.items()} for batch in global_batches()]

        def average(loss):
            dist.all_reduce(loss)  # gloo has no AVG
            return loss.item() / WORLD_SIZE

        losses = train(model, batches, average)
        model.eval()
        with torch.no_grad():
            logits = model(probe_ids()).logits  # every rank runs the forward: it gathers the shards
        out = Path(out_dir)
        save_sharded_adapter(model, out / "adapter")
        if is_main_process():
            (out / "losses.json").write_text(json.dumps(losses))
            torch.save(logits, out / "logits.pt")
        assert rank == dist.get_rank()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
