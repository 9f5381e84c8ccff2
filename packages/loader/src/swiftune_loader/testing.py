"""Tiny random models saved to a folder, for tests that must not download anything."""

from __future__ import annotations

import os
from pathlib import Path


def build_tiny_model(out_dir: str | os.PathLike, tokenizer, seed: int = 0, dtype: str = "float32", **config_overrides):
    """Save a tiny random Llama-architecture causal LM and ``tokenizer`` to ``out_dir`` (safetensors).

    Args:
        out_dir: folder to write.
        tokenizer: the tokenizer to save beside the model; the vocabulary size follows it.
        seed: initialisation seed.
        dtype: weight dtype stored in the folder.
        **config_overrides: LlamaConfig fields to change (e.g. num_hidden_layers=3).

    Returns:
        ``out_dir`` as a Path.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    fields.update(config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=fields["bos_token_id"], eos_token_id=fields["eos_token_id"], pad_token_id=fields["pad_token_id"]
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
