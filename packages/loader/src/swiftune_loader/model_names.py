"""Common model names paired with their pre-quantized bitsandbytes 4-bit repositories, in both directions.

A static table shipped with the package (nothing is fetched). ``load_in_4bit=True`` with a 16-bit name picks the
pre-quantized repository (a quarter of the download, no quantization at load time); ``load_in_4bit=False`` with a
4-bit name picks the 16-bit one, since 8-bit loading and full fine-tuning need the original weights. Lookups are
case-insensitive (the hub treats repository ids so); names not in the table pass through unchanged.
"""

from __future__ import annotations

# (16-bit repository, pre-quantized bnb 4-bit NF4 repository). A 4-bit repository may appear for several 16-bit
# names (a renamed original, a mirror): its first row names the 16-bit repository it maps back to.
MODEL_NAME_PAIRS: tuple[tuple[str, str], ...] = (
    # Llama 3.x
    ("meta-llama/Llama-3.2-1B", "unsloth/Llama-3.2-1B-bnb-4bit"),
    ("meta-llama/Llama-3.2-1B-Instruct", "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"),
    ("meta-llama/Llama-3.2-3B", "unsloth/Llama-3.2-3B-bnb-4bit"),
    ("meta-llama/Llama-3.2-3B-Instruct", "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"),
    ("meta-llama/Llama-3.1-8B", "unsloth/Meta-Llama-3.1-8B-bnb-4bit"),
    ("meta-llama/Llama-3.1-8B-Instruct", "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"),
    ("meta-llama/Meta-Llama-3.1-8B", "unsloth/Meta-Llama-3.1-8B-bnb-4bit"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"),
    ("meta-llama/Llama-3.1-70B-Instruct", "unsloth/Meta-Llama-3.1-70B-Instruct-bnb-4bit"),
    ("meta-llama/Llama-3.3-70B-Instruct", "unsloth/Llama-3.3-70B-Instruct-bnb-4bit"),
    ("meta-llama/Meta-Llama-3-8B", "unsloth/llama-3-8b-bnb-4bit"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "unsloth/llama-3-8b-Instruct-bnb-4bit"),
    ("unsloth/Llama-3.2-1B-Instruct", "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"),
    ("unsloth/Llama-3.2-3B-Instruct", "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"),
    ("unsloth/Meta-Llama-3.1-8B-Instruct", "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"),
    # Mistral
    ("mistralai/Mistral-7B-v0.3", "unsloth/mistral-7b-v0.3-bnb-4bit"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "unsloth/mistral-7b-instruct-v0.3-bnb-4bit"),
    ("mistralai/Mistral-Nemo-Base-2407", "unsloth/Mistral-Nemo-Base-2407-bnb-4bit"),
    ("mistralai/Mistral-Nemo-Instruct-2407", "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit"),
    ("mistralai/Mistral-Small-Instruct-2409", "unsloth/Mistral-Small-Instruct-2409-bnb-4bit"),
    # Qwen 2.5
    ("Qwen/Qwen2.5-0.5B", "unsloth/Qwen2.5-0.5B-bnb-4bit"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-1.5B", "unsloth/Qwen2.5-1.5B-bnb-4bit"),
    ("Qwen/Qwen2.5-1.5B-Instruct", "unsloth/Qwen2.5-1.5B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-3B", "unsloth/Qwen2.5-3B-bnb-4bit"),
    ("Qwen/Qwen2.5-3B-Instruct", "unsloth/Qwen2.5-3B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-7B", "unsloth/Qwen2.5-7B-bnb-4bit"),
    ("Qwen/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-14B-Instruct", "unsloth/Qwen2.5-14B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-32B-Instruct", "unsloth/Qwen2.5-32B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-72B-Instruct", "unsloth/Qwen2.5-72B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-Coder-7B-Instruct", "unsloth/Qwen2.5-Coder-7B-Instruct-bnb-4bit"),
    # Qwen 3
    ("Qwen/Qwen3-0.6B", "unsloth/Qwen3-0.6B-bnb-4bit"),
    ("Qwen/Qwen3-0.6B-Base", "unsloth/Qwen3-0.6B-Base-bnb-4bit"),
    ("Qwen/Qwen3-1.7B", "unsloth/Qwen3-1.7B-bnb-4bit"),
    ("Qwen/Qwen3-1.7B-Base", "unsloth/Qwen3-1.7B-Base-bnb-4bit"),
    ("Qwen/Qwen3-4B", "unsloth/Qwen3-4B-bnb-4bit"),
    ("Qwen/Qwen3-4B-Base", "unsloth/Qwen3-4B-Base-bnb-4bit"),
    ("Qwen/Qwen3-8B", "unsloth/Qwen3-8B-bnb-4bit"),
    ("Qwen/Qwen3-8B-Base", "unsloth/Qwen3-8B-Base-bnb-4bit"),
    ("Qwen/Qwen3-14B", "unsloth/Qwen3-14B-bnb-4bit"),
    ("Qwen/Qwen3-32B", "unsloth/Qwen3-32B-bnb-4bit"),
    # Gemma 2
    ("google/gemma-2-2b", "unsloth/gemma-2-2b-bnb-4bit"),
    ("google/gemma-2-2b-it", "unsloth/gemma-2-2b-it-bnb-4bit"),
    ("google/gemma-2-9b", "unsloth/gemma-2-9b-bnb-4bit"),
    ("google/gemma-2-9b-it", "unsloth/gemma-2-9b-it-bnb-4bit"),
    ("google/gemma-2-27b", "unsloth/gemma-2-27b-bnb-4bit"),
    ("google/gemma-2-27b-it", "unsloth/gemma-2-27b-it-bnb-4bit"),
    # Gemma 3
    ("google/gemma-3-1b-pt", "unsloth/gemma-3-1b-pt-bnb-4bit"),
    ("google/gemma-3-1b-it", "unsloth/gemma-3-1b-it-bnb-4bit"),
    ("google/gemma-3-4b-pt", "unsloth/gemma-3-4b-pt-bnb-4bit"),
    ("google/gemma-3-4b-it", "unsloth/gemma-3-4b-it-bnb-4bit"),
    ("google/gemma-3-12b-it", "unsloth/gemma-3-12b-it-bnb-4bit"),
    ("google/gemma-3-27b-it", "unsloth/gemma-3-27b-it-bnb-4bit"),
    # Phi-3, Phi-3.5, Phi-4
    ("microsoft/Phi-3-mini-4k-instruct", "unsloth/Phi-3-mini-4k-instruct-bnb-4bit"),
    ("microsoft/Phi-3-medium-4k-instruct", "unsloth/Phi-3-medium-4k-instruct-bnb-4bit"),
    ("microsoft/Phi-3.5-mini-instruct", "unsloth/Phi-3.5-mini-instruct-bnb-4bit"),
    ("microsoft/phi-4", "unsloth/phi-4-bnb-4bit"),
    ("microsoft/Phi-4-mini-instruct", "unsloth/Phi-4-mini-instruct-bnb-4bit"),
)


def _build_maps() -> tuple[dict[str, str], dict[str, str]]:
    to_4bit: dict[str, str] = {}
    to_16bit: dict[str, str] = {}
    for full, quantized in MODEL_NAME_PAIRS:
        to_4bit[full.lower()] = quantized
        to_16bit.setdefault(quantized.lower(), full)  # the first row wins: the canonical 16-bit repository
    return to_4bit, to_16bit


_TO_4BIT, _TO_16BIT = _build_maps()


def quantized_name(name: str) -> str | None:
    """The pre-quantized 4-bit repository of a 16-bit ``name``, or None when the table has none."""
    return _TO_4BIT.get(str(name).strip().lower())


def full_precision_name(name: str) -> str | None:
    """The 16-bit repository of a pre-quantized 4-bit ``name``, or None when ``name`` is not a 4-bit entry."""
    return _TO_16BIT.get(str(name).strip().lower())


def resolve_model_name(name: str, load_in_4bit: bool) -> str:
    """The repository to load for ``name``: its 4-bit twin when loading in 4-bit, its 16-bit twin otherwise.

    Args:
        name: a model name such as ``"meta-llama/Llama-3.2-1B-Instruct"`` (any letter case).
        load_in_4bit: whether the model is to be loaded quantized to 4-bit.

    Returns:
        The table's spelling of the twin repository, or ``name`` unchanged when the table does not pair it
        (an unknown name, or one that already is what was asked for).
    """
    if load_in_4bit:
        return quantized_name(name) or _canonical_4bit(name) or name
    return full_precision_name(name) or name


def _canonical_4bit(name: str) -> str | None:
    """The table's spelling of a 4-bit ``name`` (so that a differently cased input still resolves to one id)."""
    full = full_precision_name(name)
    return quantized_name(full) if full is not None else None
