"""Argument checks shared by the repairs, so that a wrong argument fails with a sentence a user can act on."""

from __future__ import annotations

import os


def require_fast_tokenizer(tokenizer, caller: str) -> None:
    """Raise unless ``tokenizer`` is a transformers tokenizer backed by the `tokenizers` library.

    Raises:
        TypeError: a path, a string, a slow tokenizer or another object was passed.
    """
    if isinstance(tokenizer, str | os.PathLike):
        raise TypeError(
            f"{caller}() takes a tokenizer object, not the path {str(tokenizer)!r}; "
            "load it first with swiftune_tokenizers_fix.load_tokenizer(path)."
        )
    if not hasattr(tokenizer, "get_vocab") or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise TypeError(f"{caller}() takes a transformers tokenizer, got {type(tokenizer).__name__}.")
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise TypeError(
            f"{caller}() needs a fast tokenizer (transformers' TokenizersBackend), got the slow "
            f"{type(tokenizer).__name__}; load the folder with swiftune_tokenizers_fix.load_tokenizer(path)."
        )


def require_model(model, caller: str) -> None:
    """Raise unless ``model`` is a transformers model with input embeddings.

    Raises:
        TypeError: the object has no ``get_input_embeddings``.
    """
    if isinstance(model, str | os.PathLike):
        raise TypeError(f"{caller}() takes a loaded model, not the path {str(model)!r}.")
    if not callable(getattr(model, "get_input_embeddings", None)) or model.get_input_embeddings() is None:
        raise TypeError(
            f"{caller}() takes a transformers model with input embeddings (e.g. LlamaForCausalLM), "
            f"got {type(model).__name__}."
        )


def embedding_rows(model) -> int:
    """Number of rows of the model's input embedding matrix (its usable token ids)."""
    return int(model.get_input_embeddings().weight.shape[0])


def model_configs(model):
    """The model's generation config (what ``generate`` reads, so listed first) and config, each with its name."""
    if getattr(model, "generation_config", None) is not None:
        yield "generation_config", model.generation_config
    yield "config", model.config
