"""LoRA training step on a random-init Llama of real shape: transformers + peft vs swiftune's fast path.

Same model, same LoRA (r=16 on q,k,v,o,gate,up,down, bf16 adapters), same batch, gradient checkpointing, AdamW;
swiftune adds its kernels (RMSNorm, RoPE, SwiGLU) and the fused linear cross-entropy loss. Reports tokens/s,
peak memory and the first-step loss of each (they must agree). One process, no hub:

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python bench/bench_fast_path.py --shape 1b --seq 2048 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    # Llama-3.2-1B and Llama-3.1-8B shapes (tied embeddings only for 1B, as the real models).
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, seq: int, device: str, qlora_dir: str | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if qlora_dir is not None:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = LlamaForCausalLM.from_pretrained(
            qlora_dir,
            quantization_config=quantization,
            dtype=torch.bfloat16,
            device_map={"": 0},
            attn_implementation="sdpa",
        )
    else:
        config = LlamaConfig(
            **SHAPES[shape], max_position_embeddings=max(seq, 2048), rope_theta=5e5, attn_implementation="sdpa"
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, autocast_adapter_dtype=False)  # bf16 adapters, the fair baseline
    model.train()  # transformers checkpoints only in training mode
    return model


def run(system, shape, seq, batch, steps, warmup, device, qlora_dir=None) -> dict:
    model = build(shape, seq, device, qlora_dir)
    if system == "swiftune":
        from swiftune_loader.patching import fused_causal_lm_loss, patch_model

        patch_model(model.get_base_model())

        def loss_of(batch_inputs):
            return fused_causal_lm_loss(model, batch_inputs)
    else:

        def loss_of(batch_inputs):
            return model(**batch_inputs).loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=device == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=gen).to(device)
    inputs = {"input_ids": ids, "labels": ids.clone()}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, first_loss = [], None
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_of(inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            first_loss = float(loss)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    result = {
        "system": system,
        "quant": "nf4" if qlora_dir else "bf16",
        "shape": shape,
        "seq": seq,
        "batch": batch,
        "first_loss": round(first_loss, 5),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(batch * seq / step_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    model = optimizer = None  # free the GPU memory before the next system
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--systems", default="transformers+peft,swiftune")
    parser.add_argument("--qlora", action="store_true", help="NF4 base (bitsandbytes), saved and reloaded once")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qlora_dir = None
    if args.qlora:
        import tempfile

        from transformers import LlamaConfig, LlamaForCausalLM

        qlora_dir = tempfile.mkdtemp(prefix="bench-qlora-")
        config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(args.seq, 2048), rope_theta=5e5)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(qlora_dir)
    results = []
    for system in args.systems.split(","):
        result = run(system, args.shape, args.seq, args.batch, args.steps, args.warmup, device, qlora_dir)
        print("RESULT " + json.dumps(result), flush=True)
        results.append(result)
    base = results[0]
    print(f"quant={results[0]['quant']} shape={args.shape} seq={args.seq} batch={args.batch}")
    print(f"{'system':<20}{'tokens/s':>12}{'ratio':>8}{'peak GiB':>10}{'first loss':>12}")
    for r in results:
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"{r['system']:<20}{r['tokens_per_s']:>12.0f}{ratio:>8.2f}{str(r['peak_gib']):>10}{r['first_loss']:>12.4f}"
        )


if __name__ == "__main__":
    main()
