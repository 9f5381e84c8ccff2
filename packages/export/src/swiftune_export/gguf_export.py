"""Writing a merged model folder (safetensors + config.json + tokenizer.json) as one GGUF file for llama.cpp / Ollama.

The file is written in two passes over the safetensors headers and data: the tensor table is planned from the
headers alone (names, shapes, the recipe's type for each tensor and their byte sizes are known before any data is
read), then each tensor is read, changed where llama.cpp's graph needs it, quantized and appended. Memory holds one
tensor in float32 and its encoded copy, never the model.
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
    for_llama_cpp,
    gguf_tensor_name,
)
from swiftune_export.gguf_mixes import choose_types
from swiftune_export.gguf_quant_types import QuantType, quant_type, quantize, tensor_nbytes
from swiftune_export.gguf_rope import llama3_rope_factors, longrope_factors
from swiftune_export.gguf_tokenizer import add_tokenizer, model_name
from swiftune_export.safetensors_files import iter_tensors, weight_files

# Room for the header and key-value metadata besides the vocabulary, for the free-space check.
_METADATA_ALLOWANCE = 1024**2


@dataclass
class _PlannedTensor:
    hf_name: str | None  # None: a tensor made here (rope factors), not read from the checkpoint
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
    data: np.ndarray | None = None


def write_gguf(
    model_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    quant: str = "f16",
    overwrite: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a model folder of a supported architecture as a GGUF file that llama.cpp, Ollama and transformers read.

    Supported: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, cohere, granite (see
    ``gguf_architectures``), with a byte-level BPE tokenizer or a SentencePiece-style BPE with byte fallback (Llama 2,
    Mistral v0.1, Gemma, Phi-3), written as llama.cpp's "llama" vocabulary with scores and token types.

    Args:
        model_dir: a folder with config.json, safetensors weights and tokenizer.json (a merged model, e.g. the
            output of ``merge_adapter``); its chat template (tokenizer_config.json or chat_template.jinja) is
            embedded too.
        out_file: the .gguf file to create; it appears complete or not at all.
        quant: a recipe as llama.cpp's llama-quantize names them: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``,
            ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k_s`` (alias ``q4_k``), ``q4_k_m``, ``q5_k_s`` (``q5_k``),
            ``q5_k_m``, ``q6_k``. 1-D tensors and norms stay F32; the per-tensor exceptions of each recipe and
            the fallbacks for rows that do not fill whole blocks are llama.cpp's (``gguf_mixes``).
        overwrite: replace an existing ``out_file``.
        tokenizer_dir: where tokenizer.json and the chat template are, when not in ``model_dir``.

    Returns:
        ``out_file`` as a Path.

    Raises:
        FileNotFoundError: the folder lacks config.json, safetensors weights or tokenizer.json.
        ValueError: an unsupported architecture, setting, tokenizer or quantization name.
        OutOfSpaceError: the disk cannot hold the file (the message names the space needed).
    """
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"'{model_dir}' has no config.json; pass a merged model folder.")
    config = json.loads((model_dir / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method"):
        raise ValueError(
            f"'{model_dir}' holds quantized weights ({config['quantization_config']['quant_method']}); write GGUF from "
            "a 16-bit merged folder (save_merged(..., method='merged_16bit')) or use save_gguf, which merges first."
        )
    architecture = architecture_for(config)
    recipe = quant_type(quant)
    files = weight_files(model_dir)
    vocab_size = config["vocab_size"]
    plan = _plan(files, config, architecture, recipe)
    # The vocabulary and merges take about what they take in tokenizer.json.
    tokenizer_file = Path(tokenizer_dir if tokenizer_dir is not None else model_dir) / "tokenizer.json"
    vocabulary = tokenizer_file.stat().st_size if tokenizer_file.is_file() else 0
    needed = sum(tensor_nbytes(item.qtype, item.shape) for item in plan) + vocabulary + _METADATA_ALLOWANCE
    with atomic_file(out_file, overwrite=overwrite, needed_bytes=needed) as staging:
        writer = gguf.GGUFWriter(str(staging), architecture.name)
        try:
            tokens = add_tokenizer(writer, Path(tokenizer_dir) if tokenizer_dir is not None else model_dir, vocab_size)
            writer.add_name(model_name(model_dir.name, tokens))
            writer.add_file_type(int(recipe.file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_hyperparameters(writer, config, architecture, vocab_size)
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


def _extra_tensors(config: dict) -> list[_PlannedTensor]:
    """Tensors llama.cpp reads that the checkpoint does not hold: RoPE frequency factors."""
    extra = []
    factors = llama3_rope_factors(config)
    if factors is not None:
        extra.append(_PlannedTensor(None, "rope_freqs.weight", factors.shape, data=factors))
    longrope = longrope_factors(config)
    if longrope is not None:
        for name, data in zip(("rope_factors_long.weight", "rope_factors_short.weight"), longrope, strict=True):
            extra.append(_PlannedTensor(None, name, data.shape, data=data))
    return extra


def _plan(files: list[Path], config: dict, architecture: GGUFArchitecture, recipe: QuantType) -> list[_PlannedTensor]:
    """The tensor table, in the order the data will be written, from the safetensors headers only."""
    layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(architecture.arch, layers)
    plan = _extra_tensors(config)
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                gguf_name = gguf_tensor_name(name_map, name, architecture)
                if gguf_name is not None:
                    plan.append(_PlannedTensor(name, gguf_name, tuple(handle.get_slice(name).get_shape())))
    types = choose_types([(item.gguf_name, item.shape) for item in plan], recipe, layers)
    for item in plan:
        item.qtype = types[item.gguf_name]
    return plan


def _write_data(
    writer: gguf.GGUFWriter, plan: list[_PlannedTensor], files: list[Path], config: dict, architecture: GGUFArchitecture
) -> None:
    by_name = {item.hf_name: item for item in plan if item.hf_name is not None}
    for item in plan:
        if item.hf_name is None:
            writer.write_tensor_data(item.data)
    for name, tensor in iter_tensors(files):
        item = by_name.get(name)
        if item is None:
            continue
        array = for_llama_cpp(name, tensor.to(torch.float32).numpy(), config, architecture)
        writer.write_tensor_data(quantize(array, item.qtype))
