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


# Per-architecture settings for tiny test models: each quirk of the architecture switched on and strong enough to
# change the result on a tiny random model, so that a fast path that dropped it would be caught.
ARCHITECTURE_QUIRKS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 4},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    # Soft-caps small enough to bite (scores and logits are small here); eager attention applies the first one.
    "gemma2": {
        "attn_logit_softcapping": 0.05,
        "final_logit_softcapping": 0.5,
        "sliding_window": 4,
        "attn_implementation": "eager",
    },
    "gemma3_text": {"sliding_window": 4, "attn_implementation": "eager"},
    # Every multiplier away from 1.
    "granite": {
        "embedding_multiplier": 3.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
        "logits_scaling": 4.0,
    },
    # Half of each head rotates; a sliding window.
    "phi3": {"partial_rotary_factor": 0.5, "sliding_window": 4},
    # logit_scale keeps its default 0.0625 (away from 1); use_qk_norm is left to the caller.
    "cohere": {},
}


def tiny_config(model_type: str, **fields):
    """A transformers config of ``model_type`` with its :data:`ARCHITECTURE_QUIRKS` and ``fields`` (sizes).

    Args:
        model_type: a key of :data:`ARCHITECTURE_QUIRKS` (transformers' ``config.model_type``).
        **fields: config fields, e.g. vocab_size=97, hidden_size=48; they win over the quirks.
    """
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**ARCHITECTURE_QUIRKS[model_type], **fields})
