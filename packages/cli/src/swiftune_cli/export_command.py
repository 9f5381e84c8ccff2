"""``swiftune export``: a LoRA adapter as merged safetensors, a plain peft adapter, or GGUF files for llama.cpp."""

from __future__ import annotations

import argparse

METHODS = ("merged_16bit", "lora", "gguf")


def add_parser(commands) -> None:
    """Register the ``export`` subcommand."""
    p = commands.add_parser(
        "export",
        help="merge a LoRA adapter into its base model, or write GGUF",
        description="Export a LoRA adapter: merged safetensors that plain transformers loads (default), a plain peft "
        "adapter folder, or GGUF files (with an Ollama Modelfile) for llama.cpp and Ollama.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--adapter", default="swiftune-output/adapter", help="LoRA adapter folder (from swiftune train)")
    p.add_argument("--out", default="swiftune-output/merged", help="folder to create")
    p.add_argument("--method", choices=METHODS, default="merged_16bit", help="what to write")
    p.add_argument(
        "--quant",
        action="append",
        default=None,
        help="GGUF quantization, repeatable: f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k "
        "(default: q8_0)",
    )
    p.add_argument("--base", default=None, help="base model folder (default: the one recorded in the adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="largest safetensors shard, in GiB (merged)")
    p.set_defaults(run=run)


def run(args) -> int:
    """Export and report where the result went."""
    from swiftune_export import merge_adapter, save_merged

    if args.quant and args.method != "gguf":
        raise ValueError("--quant applies to --method gguf only.")
    if args.method == "merged_16bit":
        out = merge_adapter(
            args.adapter,
            args.out,
            base_dir=args.base,
            max_shard_bytes=int(args.max_shard_size * 1024**3),
            overwrite=args.overwrite,
        )
        print(f"merged model written to {out}")
        print(f"load it with: AutoModelForCausalLM.from_pretrained('{out}')")
        return 0
    out = save_merged(
        args.adapter,
        out=args.out,
        method=args.method,
        quantization=args.quant or ["q8_0"],
        base_dir=args.base,
        overwrite=args.overwrite,
    )
    print(f"{args.method} export written to {out}:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name}")
    return 0
