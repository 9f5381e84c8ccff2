"""Writing a merged model folder that plain transformers loads: 16-bit weights, or 4-bit (bitsandbytes NF4) ones.

The stream is: base tensors (one at a time) -> 4-bit weights dequantized -> LoRA merged in float32 and cast back ->
(4-bit output: linear weights quantized to NF4) -> safetensors shards. Memory holds the adapter, one base tensor
with its float32 temporaries, and the output shard being filled: near one layer plus one shard, not the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from swiftune_export.atomic import atomic_directory
from swiftune_export.merge import merged_tensors
from swiftune_export.model_source import MergeSource, folder_source
from swiftune_export.nf4 import DequantizedTensors, is_linear_weight_name, quantization_config, quantize_nf4
from swiftune_export.safetensors_files import ShardedWriter


def write_merged(source: MergeSource, target: Path, four_bit: bool = False, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write ``source`` (its adapter merged in) into the existing folder ``target``.

    Args:
        source: the model to write.
        target: an existing, empty folder.
        four_bit: store the linear layers' weights as bitsandbytes NF4 (the base's own 4-bit settings when it was
            4-bit, else NF4 with double quantization), with the ``quantization_config`` transformers loads them by.
        max_shard_bytes: largest safetensors shard.

    Raises:
        ValueError: the adapter does not fit the base model.
    """
    base = DequantizedTensors(source.tensors())
    stream = iter(base)
    if source.adapter is not None:
        stream = merged_tensors(base, source.adapter_config, source.adapter, source.loaded_name)
    saved_name = source.saved_name or (lambda name: name)
    writer = ShardedWriter(target, max_shard_bytes)
    dtypes: dict[torch.dtype, int] = {}
    for name, tensor in stream:
        if tensor.is_floating_point():
            dtypes[tensor.dtype] = dtypes.get(tensor.dtype, 0) + tensor.numel()
        if four_bit and tensor.ndim == 2 and tensor.is_floating_point() and _is_linear(name, source, base):
            for part_name, part in quantize_nf4(
                saved_name(name), tensor, base.double_quant or not base.quantized, base.quant_type or "nf4"
            ):
                writer.add(part_name, part.to("cpu"))
        else:
            writer.add(saved_name(name), tensor.detach().to("cpu"))
    writer.close()
    source.write_side_files(target)
    config = json.loads((target / "config.json").read_text())
    config.pop("quantization_config", None)
    if four_bit:
        # The dtype most weights are in is the one the 4-bit layers compute in (the dequantized dtype when 4-bit).
        compute = base.compute_dtype or max(dtypes, key=dtypes.get, default=torch.bfloat16)
        config["quantization_config"] = quantization_config(
            compute, base.double_quant or not base.quantized, base.quant_type or "nf4"
        )
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _is_linear(name: str, source: MergeSource, base: DequantizedTensors) -> bool:
    if name in base.quantized:
        return True
    if source.linear_weights is not None:
        return name in source.linear_weights
    return is_linear_weight_name(name)


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write the base model with the LoRA adapter merged in, as sharded safetensors that plain transformers loads.

    A base stored in 4 bits (bitsandbytes NF4/FP4) is dequantized, merged in float32 and written in its 16-bit
    compute dtype; ``save_merged(..., method="merged_4bit")`` writes it back in 4 bits.

    Args:
        adapter_dir: a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
        out_dir: the folder to create; it appears complete or not at all.
        base_dir: the base model folder; defaults to the adapter config's ``base_model_name_or_path``.
        max_shard_bytes: largest safetensors shard.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileNotFoundError: the adapter, the base model or their files are missing.
        ValueError: the adapter does not fit the base model.
        OutOfSpaceError: the disk cannot hold the output (the message names the space needed).
    """
    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"Adapter folder '{adapter_dir}' does not exist.")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"'{adapter_dir}' is not a LoRA adapter folder: it needs adapter_config.json and adapter_model.safetensors."
        )
    source = folder_source(adapter_dir, base_dir)
    with atomic_directory(out_dir, overwrite=overwrite, needed_bytes=source.output_bytes) as staging:
        write_merged(source, staging, four_bit=False, max_shard_bytes=max_shard_bytes)
    return Path(out_dir)
