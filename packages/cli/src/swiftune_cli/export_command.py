"""``swiftune export``: write a merged safetensors model from a LoRA adapter."""

from __future__ import annotations

import argparse


def add_parser(commands) -> None:
    """Register the ``export`` subcommand."""
    p = commands.add_parser(
        "export",
        help="merge a LoRA adapter into its base model",
        description="Merge a LoRA adapter into its base model and write safetensors that plain transformers loads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--adapter", default="swiftune-output/adapter", help="LoRA adapter folder (from swiftune train)")
    p.add_argument("--out", default="swiftune-output/merged", help="folder to create")
    p.add_argument("--base", default=None, help="base model folder (default: the one recorded in the adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="largest safetensors shard, in GiB")
    p.set_defaults(run=run)


def run(args) -> int:
    """Merge and report where the model went."""
    from swiftune_export import merge_adapter

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
