"""FSDP2 QLoRA on 2 CPU processes (gloo): a tiny bitsandbytes NF4 model (packed weights stored as bf16) with a LoRA
adapter, sharded by fsdp2_wrap, trains as one process with the doubled batch does, and the adapter gathered on
rank 0 reloads on one process over the same 4-bit base with the same logits.

This file is also the worker program: ``torchrun --nproc-per-node 2 test_distributed_fsdp_qlora.py MODEL_DIR OUT_DIR``
trains the sharded model, then writes OUT_DIR/adapter, OUT_DIR/losses.json and OUT_DIR/logits.pt from rank 0.

Models run in train mode (no dropout anywhere here), also for the logits: in eval mode, on a CPU with AVX512-BF16,
bitsandbytes repacks a 4-bit weight for its inference kernel in place (its first layer's input needs no grad even
in training), which replaces the storage FSDP2 gathers into and breaks the gathered save.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, PER_PROCESS_BATCH, WORLD_SIZE, LENGTH = 3, 2, 2, 9
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
LORA_SEED = 3
# The same NF4 bytes dequantize to the same float32 weights in every process (compute dtype float32), so what
# differs is float32 sums taken in another order (sharded gathers, averaged gradients): a few roundings
# (eps ~1.2e-7) per step relative to values of order 1, far below 64 eps after 3 steps.
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


def nf4_model(model_dir):
    """The model quantized to NF4 on the CPU, packed weights stored as bf16 (the dtype FSDP-ready QLoRA uses)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    return model.train()


def qlora_model(model_dir):
    from peft import LoraConfig, get_peft_model

    base = nf4_model(model_dir)
    torch.manual_seed(LORA_SEED)  # the same adapter initialization in every process
    return get_peft_model(base, LoraConfig(**LORA))


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
def qlora_model_dir(tmp_path_factory):
    from swiftune_loader.testing import build_tiny_model
    from swiftune_tokenizers_fix.testing import build_chat_tokenizer

    # Every 4-bit layer's input at least 64 wide: bitsandbytes' CPU 4-bit forward fails on narrower ones.
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama-64"), build_chat_tokenizer(), hidden_size=64, intermediate_size=128
    )


@pytest.fixture(scope="module")
def fsdp_run(qlora_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp-qlora")
    run_torchrun(Path(__file__), str(qlora_model_dir), str(out_dir))
    return out_dir


def test_sharded_qlora_training_follows_one_process_with_twice_the_batch(fsdp_run, qlora_model_dir):
    torch.set_num_threads(1)
    fsdp_losses = json.loads((fsdp_run / "losses.json").read_text())
    single_losses = train(qlora_model(qlora_model_dir), global_batches(), average=float)
    assert len(fsdp_losses) == STEPS
    assert max(single_losses) - min(single_losses) > 100 * RTOL * max(single_losses), "the model did not train"
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(single_losses), rtol=RTOL, atol=0.0)


def test_gathered_qlora_adapter_reloads_on_one_process_with_the_same_logits(fsdp_run, qlora_model_dir):
    from peft import PeftModel

    torch.set_num_threads(1)
    base = nf4_model(qlora_model_dir)
    with torch.no_grad():
        base_logits = base(probe_ids()).logits
        reloaded = PeftModel.from_pretrained(base, fsdp_run / "adapter").train()
        logits = reloaded(probe_ids()).logits
    sharded_logits = torch.load(fsdp_run / "logits.pt", weights_only=True)
    assert (fsdp_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (logits - base_logits).abs().max() > 1e-2, "the saved adapter does not change the model"
    torch.testing.assert_close(logits, sharded_logits, rtol=RTOL, atol=RTOL)


def test_fsdp2_wrap_refuses_a_cast_of_packed_4bit_weights(qlora_model_dir):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from swiftune_train.distributed import check_4bit_storage

    model = qlora_model(qlora_model_dir)
    check_4bit_storage(model, torch.bfloat16)  # the storage dtype itself is no cast
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage"):
        check_4bit_storage(model, MixedPrecisionPolicy(param_dtype=torch.float32).param_dtype)


def _worker(model_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from swiftune_loader.patching.lora_parts import lora_parts
    from swiftune_train.distributed import fsdp2_wrap, is_main_process, process_rank, save_sharded_adapter

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        model = qlora_model(model_dir)
        lora_q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
        q_proj = lora_q_proj.get_base_layer()
        packed_rows = q_proj.weight.shape[0]
        model = fsdp2_wrap(model)
        assert isinstance(model, FSDPModule)
        local = q_proj.weight.to_local()
        assert local.dtype == torch.bfloat16 and local.shape[0] == packed_rows // WORLD_SIZE, "4-bit weights unsharded"
        seen = []
        lora_q_proj.register_forward_pre_hook(lambda module, args: seen.append(lora_parts(module)))
        rows = slice(process_rank() * PER_PROCESS_BATCH, (process_rank() + 1) * PER_PROCESS_BATCH)
        batches = [{key: value[rows] for key, value in batch.items()} for batch in global_batches()]

        def average(loss):
            dist.all_reduce(loss)  # gloo has no AVG
            return loss.item() / WORLD_SIZE

        losses = train(model, batches, average)
        # What swiftune's fused LoRA kernels read in a forward: the whole gathered 4-bit weight with its quant_state.
        assert len(seen) == STEPS and all(parts is not None for parts in seen), "the fused LoRA path was refused"
        for parts in seen:
            assert type(parts.weight).__name__ != "DTensor" and parts.weight.shape[0] == packed_rows
            assert parts.weight.quant_state is q_proj.quant_state
        with torch.no_grad():
            logits = model(probe_ids()).logits  # every rank runs the forward: it gathers the shards
        out = Path(out_dir)
        save_sharded_adapter(model, out / "adapter")
        if is_main_process():
            (out / "losses.json").write_text(json.dumps(losses))
            torch.save(logits, out / "logits.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
