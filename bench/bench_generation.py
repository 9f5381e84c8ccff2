"""Greedy generation tokens/s: FastLanguageModel.for_inference with swiftune's fast path vs plain transformers.

One random-init model of Llama-3.2-1B shape in bf16 (sdpa attention), the same weights for both systems: plain
transformers' ``generate`` first, then the same model patched with swiftune's kernels and switched to inference
mode by ``FastLanguageModel.for_inference``. Random prompts of 128 tokens, 256 new tokens (end-of-sequence off, so
every run generates them all), batch 1 and 8, warmup, CUDA-synchronised timing (median of the repeats). Prints one
``RESULT {json}`` line per system and batch, the greedy-agreement check, and a table last. No hub:

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python bench/bench_generation.py
    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python bench/bench_generation.py --smoke   # tiny, on the CPU

Greedy agreement: bf16 kernels round differently from PyTorch's ops, so on a random model two systems may pick
different tokens where the top two logits are within rounding of each other. The check passes when the generated
tokens are identical, or when at the first position where they differ the reference's top-two logit margin is
below ``--tie-margin`` (a near-tie); otherwise the script exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SHAPES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_theta=5e5,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = None  # generate every requested token
    model.generation_config.pad_token_id = 0
    return model.eval()


def time_generation(model, prompts, new_tokens: int, repeats: int, warmup: int, device: str):
    """Median seconds of one generate call and its output tokens (the last call's)."""

    def generate():
        with torch.no_grad():
            return model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )

    for _ in range(warmup):
        generate()
    times, output = [], None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = generate()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), output[:, prompts.shape[1] :]


def agreement(reference_model, prompts, reference: torch.Tensor, other: torch.Tensor, tie_margin: float) -> dict:
    """Whether the greedy outputs agree, allowing a first difference only at a near-tie of the reference."""
    same = reference == other
    result = {"tokens_identical": bool(same.all()), "match_fraction": round(same.float().mean().item(), 4)}
    if result["tokens_identical"]:
        return {**result, "agree": True}
    row = int((~same).any(dim=1).nonzero()[0])
    position = int((~same[row]).nonzero()[0])
    prefix = torch.cat([prompts[row : row + 1], reference[row : row + 1, :position]], dim=1)
    with torch.no_grad():
        logits = reference_model(prefix).logits[0, -1].float()
    top2 = logits.topk(2).values
    margin = float(top2[0] - top2[1])
    return {**result, "first_difference": [row, position], "margin": round(margin, 4), "agree": margin < tie_margin}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tie-margin", type=float, default=0.05, help="top-2 logit margin counted as a tie")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few tokens, on the CPU")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.batches, args.prompt_tokens, args.new_tokens, args.repeats = "tiny", "1,2", 16, 8, 1
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    from swiftune_loader import FastLanguageModel
    from swiftune_loader.patching import patch_model

    model = build(args.shape, device, dtype)
    vocab = SHAPES[args.shape]["vocab_size"]
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(3, vocab, (b, args.prompt_tokens), generator=gen).to(device) for b in batches}

    results, outputs, handle = [], {}, None
    for system in ("transformers", "swiftune"):
        if system == "swiftune":
            handle = patch_model(model)
            FastLanguageModel.for_inference(model)
        for batch in batches:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, tokens = time_generation(model, prompts[batch], args.new_tokens, args.repeats, args.warmup, device)
            outputs[system, batch] = tokens
            result = {
                "system": system,
                "shape": args.shape,
                "dtype": str(dtype).removeprefix("torch."),
                "batch": batch,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "seconds": round(seconds, 4),
                "tokens_per_s": round(batch * args.new_tokens / seconds, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            }
            print("RESULT " + json.dumps(result), flush=True)
            results.append(result)

    handle.revert()  # the tie check reads the reference's logits: plain transformers again
    checks = {}
    for batch in batches:
        check = agreement(
            model, prompts[batch], outputs["transformers", batch], outputs["swiftune", batch], args.tie_margin
        )
        checks[batch] = check
        print("CHECK " + json.dumps({"batch": batch, **check}), flush=True)

    print(f"shape={args.shape} prompt={args.prompt_tokens} new={args.new_tokens} greedy, {device}")
    print(f"{'system':<14}{'batch':>6}{'tokens/s':>12}{'ratio':>8}{'peak GiB':>10}{'greedy agrees':>15}")
    base = {r["batch"]: r["tokens_per_s"] for r in results if r["system"] == "transformers"}
    for r in results:
        ratio = r["tokens_per_s"] / base[r["batch"]]
        agrees = "-" if r["system"] == "transformers" else str(checks[r["batch"]]["agree"])
        print(
            f"{r['system']:<14}{r['batch']:>6}{r['tokens_per_s']:>12.1f}{ratio:>8.2f}{str(r['peak_gib']):>10}"
            f"{agrees:>15}"
        )
    if not all(c["agree"] for c in checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
