"""``swiftune export``: a training output (LoRA adapter) or a model folder as merged safetensors, a plain peft
adapter, or GGUF files (one per quantization type) with an Ollama Modelfile; progress is printed step by step."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHODS = ("merged_16bit", "merged_4bit", "lora", "gguf")
DEFAULT_SOURCE = "swiftune-output/adapter"
# llama.cpp's usual trade-off of size and quality; the numpy-only types (q8_0, f16) are one --quant away.
DEFAULT_QUANTS = ("q4_k_m",)


def add_parser(commands, parents=()) -> None:
    """Register the ``export`` subcommand."""
    p = commands.add_parser(
        "export",
        parents=list(parents),
        help="merge, convert to GGUF (+ Ollama Modelfile), or copy out a LoRA adapter",
        description="Export a training output (its LoRA adapter folder, or the output folder that holds adapter/) or "
        "a model folder: merged safetensors that plain transformers loads (default), a plain peft adapter folder, "
        "merged with the linear layers stored 4-bit (bitsandbytes NF4), or GGUF files for llama.cpp with an Ollama "
        "Modelfile. A base stored in 4 bits is dequantized first.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", nargs="?", default=None, help=f"adapter or model folder (default: {DEFAULT_SOURCE})")
    p.add_argument("--adapter", "--model", dest="source_flag", default=None, help="same as SOURCE")
    p.add_argument("--out", default=None, help="folder to create (default: swiftune-output/<method>)")
    p.add_argument("--method", choices=METHODS, default="merged_16bit", help="what to write")
    p.add_argument(
        "--quant",
        action="append",
        default=None,
        metavar="Q[,Q...]",
        help="GGUF types, comma-separated or repeated, one file each: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, "
        f"q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (default: {','.join(DEFAULT_QUANTS)})",
    )
    p.add_argument("--base", default=None, help="base model folder (default: the one recorded in the adapter)")
    p.add_argument("--no-modelfile", action="store_true", help="GGUF: do not write an Ollama Modelfile")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="largest safetensors shard, in GiB (merged)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export and report where the result went."""
    if args.source is not None and args.source_flag is not None and args.source != args.source_flag:
        raise ValueError("Give the source once: as SOURCE or as --adapter/--model, not both.")
    source = _source_folder(args.source or args.source_flag or DEFAULT_SOURCE)
    quants = [q.strip().lower() for item in args.quant or [] for q in item.split(",") if q.strip()]
    if quants and args.method != "gguf":
        raise ValueError("--quant applies to --method gguf only.")
    out = Path(args.out or f"swiftune-output/{args.method}")
    start = time.perf_counter()
    print(f"exporting {source} as {args.method} to {out}", flush=True)
    if args.method == "gguf":
        _export_gguf(source, out, quants or list(DEFAULT_QUANTS), args)
    elif args.method == "merged_16bit" and (source / "adapter_config.json").is_file():
        from swiftune_export import merge_adapter

        _step(1, 1, "merging the adapter into its base model, tensor by tensor")
        merge_adapter(
            source,
            out,
            base_dir=args.base,
            max_shard_bytes=int(args.max_shard_size * 1024**3),
            overwrite=args.overwrite,
        )
    else:
        from swiftune_export import save_merged

        _step(1, 1, f"writing {args.method}")
        save_merged(
            source,
            out=out,
            method=args.method,
            base_dir=args.base,
            overwrite=args.overwrite,
            max_shard_bytes=int(args.max_shard_size * 1024**3),
        )
    print(f"done in {time.perf_counter() - start:.1f} s: {out}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<40} {_size(path)}")
    _print_next_steps(out, args.method)
    return 0


def _export_gguf(source: Path, out: Path, quants: list[str], args) -> None:
    """Merge (an adapter) or dequantize (a 4-bit model) into a scratch folder inside the staging folder, then write
    one GGUF per type."""
    import shutil

    from swiftune_export import atomic_directory, save_merged, write_gguf, write_modelfile
    from swiftune_export.gguf_quant_types import quant_type

    for name in quants:
        quant_type(name)  # an unknown name fails before any work
    is_adapter = (source / "adapter_config.json").is_file()
    # GGUF is written from 16-bit safetensors: an adapter is merged into its base, a quantized model dequantized.
    needs_merge = is_adapter or _stored_quantized(source)
    total = len(quants) + int(needs_merge) + int(not args.no_modelfile)
    step = 0
    with atomic_directory(out, overwrite=args.overwrite) as staging:
        model_dir = source
        if needs_merge:
            step += 1
            what = "merging the adapter into its base model" if is_adapter else "dequantizing the 4-bit weights"
            _step(step, total, f"{what} (the GGUF's source)")
            model_dir = save_merged(
                source, out=staging / ".merged", method="merged_16bit", base_dir=args.base, overwrite=True
            )
        files = []
        for name in quants:
            step += 1
            _step(step, total, f"writing GGUF {name}")
            began = time.perf_counter()
            files.append(write_gguf(model_dir, staging / f"model-{name}.gguf", quant=name))
            print(f"        {files[-1].name}: {_size(files[-1])} in {time.perf_counter() - began:.1f} s", flush=True)
        if not args.no_modelfile:
            step += 1
            _step(step, total, f"writing the Ollama Modelfile (FROM {files[0].name})")
            try:
                write_modelfile(staging, files[0], tokenizer=model_dir)
            except ValueError as error:  # an unknown chat format: the GGUF files are still the export
                print(f"        no Modelfile: {' '.join(str(error).split())}", flush=True)
        if needs_merge:
            shutil.rmtree(model_dir)


def _source_folder(name: str) -> Path:
    """The folder to export; a training output folder stands for the adapter inside it."""
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Export source '{path}' does not exist; pass an adapter or model folder.")
    if path.is_file():
        raise FileNotFoundError(f"Export source '{path}' is a file; pass an adapter or model folder.")
    if not (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        if (path / "adapter" / "adapter_config.json").is_file():
            return path / "adapter"
        raise FileNotFoundError(f"'{path}' is neither an adapter folder (adapter_config.json) nor a model folder.")
    return path


def _stored_quantized(model_dir: Path) -> bool:
    config = model_dir / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("quantization_config"))


def _step(index: int, total: int, text: str) -> None:
    print(f"  [{index}/{total}] {text}", flush=True)


def _size(path: Path) -> str:
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{size / 1024**2:.1f} MiB" if size >= 1024**2 else f"{size / 1024:.1f} KiB"


def _print_next_steps(out: Path, method: str) -> None:
    if method == "gguf":
        first = sorted(out.glob("*.gguf"))[0]
        print(f"next: swiftune chat {first} --prompt 'Hello'")
        if (out / "Modelfile").is_file():
            print(f"      ollama create my-model -f {out / 'Modelfile'}")
    elif method == "lora":
        print(f"load it with: PeftModel.from_pretrained(base_model, '{out}')")
    else:
        print(f"load it with: AutoModelForCausalLM.from_pretrained('{out}'), or: swiftune chat {out}")
