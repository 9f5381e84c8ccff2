"""Writing a merged model folder (safetensors + config.json + tokenizer.json) as one GGUF file for llama.cpp / Ollama.

The file is written in two passes over the safetensors headers and data: the tensor table is planned from the
headers alone (names, shapes, target types and byte sizes are known before any data is read), then each tensor
is read, reordered where llama.cpp needs it, quantized and appended. Memory holds one tensor in float32 and its
encoded copy, never the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from swiftune_export.atomic import atomic_file
from swiftune_export.gguf_architectures import (
    GGUFArchitecture,
    add_hyperparameters,
    architecture_for,
    gguf_tensor_name,
    llama3_rope_factors,
    permute_for_llama_rope,
)
from swiftune_export.gguf_quant_types import quant_type, quantize, tensor_nbytes, tensor_type
from swiftune_export.gguf_tokenizer import add_tokenizer
from swiftune_export.safetensors_files import iter_tensors, weight_files


@dataclass
class _PlannedTensor:
    hf_name: str | None  # None: a tensor made here (rope factors), not read from the checkpoint
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType


def write_gguf(
    model_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    quant: str = "f16",
    overwrite: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a Llama, Mistral or Qwen2 model folder as a GGUF file that llama.cpp, Ollama and transformers read.

    Args:
        model_dir: a folder with config.json, safetensors weights and tokenizer.json (a merged model, e.g. the
            output of ``merge_adapter``); its chat template (tokenizer_config.json or chat_template.jinja) is
            embedded too.
        out_file: the .gguf file to create; it appears complete or not at all.
        quant: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k``, ``q5_k`` or
            ``q6_k`` for the 2-D weights. 1-D tensors stay F32; a weight whose rows do not fill whole blocks
            falls back to Q8_0 or F16.
        overwrite: replace an existing ``out_file``.
        tokenizer_dir: where tokenizer.json and the chat template are, when not in ``model_dir``.

    Returns:
        ``out_file`` as a Path.

    Raises:
        FileNotFoundError: the folder lacks config.json, safetensors weights or tokenizer.json.
        ValueError: an unsupported architecture, tokenizer or quantization name.
    """
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"'{model_dir}' has no config.json; pass a merged model folder.")
    config = json.loads((model_dir / "config.json").read_text())
    architecture = architecture_for(config)
    requested = quant_type(quant)
    files = weight_files(model_dir)
    vocab_size = config["vocab_size"]
    plan = _plan(files, config, architecture, requested.qtype)
    with atomic_file(out_file, overwrite=overwrite) as staging:
        writer = gguf.GGUFWriter(str(staging), architecture.name)
        try:
            writer.add_name(model_dir.name)
            writer.add_file_type(int(requested.file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_hyperparameters(writer, config, vocab_size)
            add_tokenizer(writer, Path(tokenizer_dir) if tokenizer_dir is not None else model_dir, vocab_size)
            for item in plan:
                # The dtype given here only has to be something other than uint8: shapes are in elements.
                writer.add_tensor_info(
                    item.gguf_name, item.shape, np.dtype(np.float32), tensor_nbytes(item.qtype, item.shape), item.qtype
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_data(writer, plan, files, config, architecture)
        finally:
            writer.close()
    return Path(out_file)


def _plan(
    files: list[Path], config: dict, architecture: GGUFArchitecture, requested: gguf.GGMLQuantizationType
) -> list[_PlannedTensor]:
    """The tensor table, in the order the data will be written, from the safetensors headers only."""
    name_map = gguf.get_tensor_name_map(architecture.arch, config["num_hidden_layers"])
    plan = []
    factors = llama3_rope_factors(config)
    if factors is not None:
        rope_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(_PlannedTensor(None, rope_name, factors.shape, gguf.GGMLQuantizationType.F32))
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                gguf_name = gguf_tensor_name(name_map, name)
                if gguf_name is None:
                    continue
                shape = tuple(handle.get_slice(name).get_shape())
                plan.append(_PlannedTensor(name, gguf_name, shape, tensor_type(requested, shape)))
    return plan


def _write_data(
    writer: gguf.GGUFWriter, plan: list[_PlannedTensor], files: list[Path], config: dict, architecture: GGUFArchitecture
) -> None:
    by_name = {item.hf_name: item for item in plan}
    if plan and plan[0].hf_name is None:
        writer.write_tensor_data(llama3_rope_factors(config))
    for name, tensor in iter_tensors(files):
        item = by_name.get(name)
        if item is None:
            continue
        array = tensor.to(torch.float32).numpy()
        array = _for_llama_cpp(name, array, config, architecture)
        writer.write_tensor_data(quantize(array, item.qtype))


def _for_llama_cpp(name: str, array: np.ndarray, config: dict, architecture: GGUFArchitecture) -> np.ndarray:
    if not architecture.permute_qk:
        return array
    heads = config["num_attention_heads"]
    if ".self_attn.q_proj." in name:
        return permute_for_llama_rope(array, heads)
    if ".self_attn.k_proj." in name:
        return permute_for_llama_rope(array, config.get("num_key_value_heads") or heads)
    return array
