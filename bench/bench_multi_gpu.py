"""Multi-GPU training with swiftune's kernels inside: DDP on 1 vs 2 GPUs, and FSDP2 of a model too big for one GPU.

- ddp:  an 8B-shaped (Llama-3-8B) QLoRA model (NF4 base, bf16 LoRA r=16 on every decoder linear, swiftune's fast
        path and fused linear cross-entropy). First rank 0 trains alone (one GPU), then every rank trains the same
        model wrapped in DistributedDataParallel with the same per-GPU batch. Target: 2-GPU tokens/s >= 1.8x one GPU.
- fsdp: a 70B-shaped (Llama-3-70B) bf16 LoRA model, built on the meta device and materialized shard by shard by
        FSDP2 (swiftune_train.distributed.fsdp2_wrap), so no process ever holds the whole model: its 141 GB of bf16
        weights do not fit on one H200. Short sequences. ``--fsdp-shape 32b`` picks a Qwen2.5-32B-shaped model.

Weights are random (nothing is downloaded; the numbers measure speed, not learning). tokens/s counts the tokens
of all ranks per optimizer step over the median step time after warmup; peak memory is the largest
torch.cuda.max_memory_allocated over the ranks. Prints ``RESULT {json}`` lines and a table from rank 0:

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) torchrun --nproc-per-node 2 bench/bench_multi_gpu.py
    ... bench/bench_multi_gpu.py --modes fsdp --fsdp-shape 70b --seq-len 512
    PYTHONPATH=... torchrun --nproc-per-node 2 bench/bench_multi_gpu.py --smoke    # tiny shapes, CPU, gloo
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

SHAPES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),  # fmt: skip
    "32b": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
    ),  # fmt: skip
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),  # fmt: skip
    # Llama-3-70B widths with 100 layers (~88B parameters, ~163 GiB of bf16 weights): more than one H200 holds.
    "88b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=100,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),  # fmt: skip
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),  # fmt: skip
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT_STD = 0.02


def setup() -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU); this process's device."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Rank 1 waits at a barrier while rank 0 trains alone: allow it the time.
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return device


def llama_config(shape: str, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len, 256), tie_word_embeddings=False)


def _materialize_rest(model, device: torch.device) -> None:
    """Give the parameters still on the meta device random values on ``device``, and rebuild the rotary buffers."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.device.type == "meta":
                    value = torch.empty(param.shape, dtype=param.dtype, device=device)
                    if "norm" in type(module).__name__.lower():
                        value.fill_(1.0)
                    else:
                        value.normal_(0, INIT_STD)
                    setattr(module, name, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    _rebuild_rotary(model, device)


def _rebuild_rotary(model, device: torch.device) -> None:
    """The rotary embedding's inverse frequencies are a computed buffer: build the module again on ``device``."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    rotary = base.model.rotary_emb
    base.model.rotary_emb = type(rotary)(config=base.config).to(device)


def build_qlora_model(shape: str, seq_len: int, device: torch.device, fast_path: bool):
    """An NF4 QLoRA model of ``shape`` with random weights, quantized one linear at a time on ``device``."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # every rank builds the same weights (DDP broadcasts only tensors, not quant states)
    config = llama_config(shape, seq_len)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
                    quant_type="nf4", device="meta",
                )  # fmt: skip
                weight = torch.empty(linear.out_features, linear.in_features, dtype=torch.bfloat16, device=device)
                quantized.weight = bnb.nn.Params4bit(
                    weight.normal_(0, INIT_STD), requires_grad=False, quant_type="nf4"
                ).to(device)
                setattr(parent, name, quantized)
    _materialize_rest(model, device)
    model.config.quantization_config = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    model.is_loaded_in_4bit = True
    if fast_path:
        from swiftune_loader.patching import patch_model

        patch_model(model)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora).to(device)


def build_fsdp_model(shape: str, seq_len: int, device: torch.device, fast_path: bool):
    """A bf16 LoRA model of ``shape`` sharded by FSDP2 from the meta device: each rank materializes its shards only."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.tensor import DTensor
    from transformers import LlamaForCausalLM

    from swiftune_train.distributed import fsdp2_wrap

    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape, seq_len)).to(torch.bfloat16)
        if fast_path:
            from swiftune_loader.patching import patch_model

            patch_model(model)
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    fsdp2_wrap(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if "lora_B" in name:
                local.zero_()
            elif "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0, INIT_STD)
    _rebuild_rotary(model, device)
    return model


def random_batches(count: int, batch: int, seq_len: int, vocab: int, device: torch.device, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)
        batches.append({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_and_time(model, batches: list[dict], warmup: int, device: torch.device, group_size: int) -> dict:
    """AdamW steps with swiftune's fused loss; tokens/s of ``group_size`` ranks over the median post-warmup step."""
    from swiftune_loader.patching import fused_causal_lm_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for batch in batches:
        _sync(device)
        start = time.perf_counter()
        loss = fused_causal_lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step_time = statistics.median(times[warmup:] or times)
    tokens = batches[0]["input_ids"].numel() * group_size
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if not all(torch.isfinite(torch.tensor(losses))):
        raise FloatingPointError(f"non-finite loss: {losses}")
    return {"step_s": step_time, "tokens_per_s": tokens / step_time, "peak_gib": peak, "first_loss": losses[0]}


def _max_over_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_ddp(args, device: torch.device) -> list[dict]:
    """One GPU (rank 0 alone), then all ranks under DDP, on the same per-GPU batch."""
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = SHAPES[args.ddp_shape]["vocab_size"]
    steps = args.warmup + args.steps
    common = {"mode": "ddp", "shape": args.ddp_shape, "seq_len": args.seq_len, "batch_per_gpu": args.batch}
    results = []
    if rank == 0:
        model = build_qlora_model(args.ddp_shape, args.seq_len, device, args.fast_path)
        batches = random_batches(steps, args.batch, args.seq_len, vocab, device, seed=1)
        results.append({**common, "gpus": 1, **train_and_time(model, batches, args.warmup, device, group_size=1)})
        del model, batches
        _free(device)
    dist.barrier()
    model = build_qlora_model(args.ddp_shape, args.seq_len, device, args.fast_path)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    batches = random_batches(steps, args.batch, args.seq_len, vocab, device, seed=1 + rank)
    measured = train_and_time(ddp, batches, args.warmup, device, group_size=world)
    measured["step_s"] = _max_over_ranks(measured["step_s"], device)  # the slowest rank sets the pace
    measured["tokens_per_s"] = args.batch * args.seq_len * world / measured["step_s"]
    measured["peak_gib"] = _max_over_ranks(measured["peak_gib"], device)
    results.append({**common, "gpus": world, **measured})
    del ddp, model, batches
    _free(device)
    if rank == 0:
        speedup = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
        results[1].update(speedup=speedup, target_speedup=0.9 * world, meets_target=speedup >= 0.9 * world)
    return results


def run_fsdp(args, device: torch.device) -> list[dict]:
    """All ranks train one model sharded by FSDP2."""
    world = dist.get_world_size()
    config = SHAPES[args.fsdp_shape]
    model = build_fsdp_model(args.fsdp_shape, args.seq_len, device, args.fast_path)
    params = sum(p.numel() for p in model.parameters())  # DTensor numel is the global size
    batches = random_batches(args.warmup + args.steps, args.batch, args.seq_len, config["vocab_size"], device, seed=7)
    measured = train_and_time(model, batches, args.warmup, device, group_size=world)
    measured["step_s"] = _max_over_ranks(measured["step_s"], device)
    measured["tokens_per_s"] = args.batch * args.seq_len * world / measured["step_s"]
    measured["peak_gib"] = _max_over_ranks(measured["peak_gib"], device)
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    weights_gib = params * 2 / 2**30
    del model, batches
    _free(device)
    fits = None if gpu_gib is None else weights_gib <= gpu_gib
    return [
        {
            "mode": "fsdp",
            "shape": args.fsdp_shape,
            "gpus": world,
            "seq_len": args.seq_len,
            "batch_per_gpu": args.batch,
            "params_b": params / 1e9,
            "bf16_weights_gib": weights_gib,
            "gpu_memory_gib": gpu_gib,
            "bf16_weights_fit_one_gpu": fits,
            **measured,
        }
    ]


def print_table(results: list[dict]) -> None:
    columns = f"{'mode':<5} {'shape':<5} {'gpus':>4} {'seq':>5} {'bs/gpu':>6} {'step s':>8} {'tok/s':>10}"
    header = columns + f" {'peak GiB':>9}"
    print(header + " note")
    for r in results:
        note = ""
        if "speedup" in r:
            verdict = "ok" if r["meets_target"] else "MISSED"
            note = f"speedup {r['speedup']:.2f}x (target {r['target_speedup']:.1f}x: {verdict})"
        if r["mode"] == "fsdp":
            note = f"{r['params_b']:.1f}B params, bf16 weights {r['bf16_weights_gib']:.0f} GiB"
            if r["gpu_memory_gib"] is not None:
                note += f" vs {r['gpu_memory_gib']:.0f} GiB per GPU"
        print(
            f"{r['mode']:<5} {r['shape']:<5} {r['gpus']:>4} {r['seq_len']:>5} {r['batch_per_gpu']:>6} "
            f"{r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} {r['peak_gib']:>9.1f} {note}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="ddp,fsdp", help="comma-separated: ddp, fsdp")
    parser.add_argument("--ddp-shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--fsdp-shape", default="70b", choices=sorted(SHAPES))
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (ddp 2048, fsdp 512)")
    parser.add_argument("--batch", type=int, default=None, help="rows per GPU per step (ddp 4, fsdp 1)")
    parser.add_argument("--steps", type=int, default=8, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-fast-path", dest="fast_path", action="store_false", help="plain transformers layers")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (gloo): checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.ddp_shape = args.fsdp_shape = "tiny"
        args.steps, args.warmup = 2, 1
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    device = setup()
    results = []
    try:
        for mode in args.modes.split(","):
            defaults = {"ddp": (2048, 4), "fsdp": (512, 1)}[mode]
            mode_args = argparse.Namespace(**vars(args))
            mode_args.seq_len = args.seq_len or (16 if args.smoke else defaults[0])
            mode_args.batch = args.batch or (2 if args.smoke else defaults[1])
            results += run_ddp(mode_args, device) if mode == "ddp" else run_fsdp(mode_args, device)
            dist.barrier()
        if dist.get_rank() == 0:
            for result in results:
                print("RESULT " + json.dumps(result), flush=True)
            print_table(results)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
