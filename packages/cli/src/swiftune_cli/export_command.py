"""``swiftune export``: a training output (LoRA adapter) or a model folder as merged safetensors, a plain peft
adapter, or GGUF files (one per quantization type) with an Ollama Modelfile; progress is printed step by step."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHODS = ("merged_16bit", "merged_4bit", "lora", "gguf")
DEFAULT_SOURCE = "swiftune-output/adapter"


def add_parser(commands, parents=()) -> None:
    """Register the ``export`` subcommand."""
    p = commands.add_parser(
        "export",
        parents=list(parents),
        help="merge, convert to GGUF (+ Ollama Modelfile), or copy out a LoRA adapter",
        description="Export a training output (its LoRA adapter folder, or the output folder that holds adapter/) or "
        "a model folder: merged safetensors that plain transformers loads (default), a plain peft adapter folder, "
        "or GGUF files for llama.cpp with an Ollama Modelfile.",
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
        help="GGUF types, comma-separated or repeated: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, "
        "q6_k, q4_k_m, q5_k_m (default: q8_0)",
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
        _export_gguf(source, out, quants or ["q8_0"], args)
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
        save_merged(source, out=out, method=args.method, base_dir=args.base, overwrite=args.overwrite)
    print(f"done in {time.perf_counter() - start:.1f} s: {out}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<40} {_size(path)}")
    _print_next_steps(out, args.method)
    return 0


def _export_gguf(source: Path, out: Path, quants: list[str], args) -> None:
    """Merge (for an adapter) into a scratch folder inside the staging folder, then write one GGUF per type."""
    import shutil

    from swiftune_export import atomic_directory, write_gguf, write_modelfile
    from swiftune_export.gguf_quant_types import quant_type

    for name in quants:
        quant_type(name)  # an unknown name fails before any work
    is_adapter = (source / "adapter_config.json").is_file()
    _refuse_quantized(Path(args.base) if args.base else _adapter_base(source) if is_adapter else source)
    total = len(quants) + int(is_adapter) + int(not args.no_modelfile)
    step = 0
    with atomic_directory(out, overwrite=args.overwrite) as staging:
        model_dir = source
        if is_adapter:
            from swiftune_export import merge_adapter

            step += 1
            _step(step, total, "merging the adapter into its base model (the GGUF's source)")
            model_dir = merge_adapter(source, staging / ".merged", base_dir=args.base, overwrite=True)
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
        if is_adapter:
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


def _adapter_base(adapter: Path) -> Path:
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    return Path(base).expanduser()


def _refuse_quantized(model_dir: Path) -> None:
    config = model_dir / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("quantization_config"):
        raise ValueError(
            f"'{model_dir}' is stored quantized (4-bit or 8-bit); GGUF export needs its 16-bit weights: pass --base "
            "the unquantized folder."
        )


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
