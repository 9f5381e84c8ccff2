"""Embedding rows for tokens the model lacks: growing the matrices, initialising new rows, marking them trainable."""

from __future__ import annotations

from collections.abc import Iterable

from swiftune_tokenizers_fix._validate import embedding_rows, require_fast_tokenizer, require_model
from swiftune_tokenizers_fix.report import Repair, preview, report

# Attribute set on the model listing token ids whose embedding rows must be trained (new or never-trained rows).
# A trainer reads it with trainable_token_ids(model): with LoRA, these rows need peft's trainable_token_indices (or
# the embeddings in modules_to_save), otherwise they keep their initial values.
TRAINABLE_TOKEN_IDS_ATTR = "swiftune_trainable_token_ids"
INIT_METHODS = ("mean", "interpolation")


def trainable_token_ids(model) -> list[int]:
    """Token ids whose embedding rows the repairs initialised and that therefore need training."""
    return sorted(getattr(model, TRAINABLE_TOKEN_IDS_ATTR, ()))


def mark_for_training(model, token_ids: Iterable[int]) -> None:
    """Record ``token_ids`` as needing training and let gradients reach the embedding matrices."""
    ids = set(getattr(model, TRAINABLE_TOKEN_IDS_ATTR, ())) | {int(i) for i in token_ids}
    setattr(model, TRAINABLE_TOKEN_IDS_ATTR, sorted(ids))
    for _, weight in embedding_matrices(model):
        weight.requires_grad_(True)


def embedding_matrices(model) -> list[tuple[str, object]]:
    """The input embedding weight and, when it is a separate tensor, the output (lm_head) weight, with names."""
    matrices = [("input embeddings", model.get_input_embeddings().weight)]
    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if output is not None and output.weight.data_ptr() != matrices[0][1].data_ptr():
        matrices.append(("lm_head", output.weight))
    return matrices


def fix_embedding_size(tokenizer, model) -> Repair | None:
    """Grow the model's embeddings when the tokenizer has token ids beyond their last row.

    Such ids (added tokens, a new pad token) index past the matrix: a CUDA device-side assert on the GPU, an
    IndexError on the CPU. The new rows are set to the mean of the existing ones, a neutral start that does not
    disturb the output distribution, and marked for training.

    Args:
        tokenizer: a fast tokenizer.
        model: a transformers model; its embeddings (and ``config.vocab_size``) are resized in place.

    Returns:
        The repair, or None when every token id has a row.
    """
    require_fast_tokenizer(tokenizer, "fix_embedding_size")
    require_model(model, "fix_embedding_size")
    vocab = tokenizer.get_vocab()
    old_rows, needed = embedding_rows(model), max(vocab.values()) + 1
    if needed <= old_rows:
        return None
    new_ids = list(range(old_rows, needed))
    _grow(model, needed)
    _init_rows(model, new_ids, trained_rows=old_rows, init="mean", pieces=None)
    mark_for_training(model, new_ids)
    names = {index: token for token, index in vocab.items()}
    return report(
        "embedding_size",
        f"token ids {old_rows}..{needed - 1} ({preview(names.get(i) for i in new_ids)}) beyond the model's "
        f"{old_rows} embedding rows",
        f"grew the embeddings to {needed} rows, set the new rows to the mean of the others and marked them for "
        "training",
    )


def add_new_tokens(model, tokenizer, tokens: list[str], init: str = "mean", special: bool = False) -> list[int]:
    """Add tokens to the tokenizer and give each an embedding row that starts from a sensible value.

    The embeddings grow only when the new ids do not fit: a vocabulary padded to a multiple of 64 or 128 (Qwen,
    Llama 3) already has spare rows and is never shrunk to the tokenizer's length.

    Args:
        model: a transformers model, changed in place.
        tokenizer: a fast tokenizer, changed in place.
        tokens: the token strings; those already in the vocabulary are left as they are.
        init: ``"mean"`` sets each new row to the mean of the trained rows; ``"interpolation"`` averages that mean
            with the mean of the rows of the pieces the token was split into before it was added, so that a word
            such as ``"Quillhaven"`` starts near what its pieces meant.
        special: add them as special tokens (never split, skipped when decoding with ``skip_special_tokens``).

    Returns:
        The ids of ``tokens``, in order. The new ones are marked for training (see :func:`trainable_token_ids`).

    Raises:
        ValueError: ``init`` is unknown or ``tokens`` holds an empty string.
        TypeError: ``tokens`` is a single string.
    """
    require_model(model, "add_new_tokens")
    require_fast_tokenizer(tokenizer, "add_new_tokens")
    if isinstance(tokens, str):
        raise TypeError(f"add_new_tokens() takes a list of tokens; pass [{tokens!r}].")
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}.")
    if any(not isinstance(token, str) or not token for token in tokens):
        raise ValueError("every token must be a non-empty string.")
    vocab = tokenizer.get_vocab()
    new = [token for token in dict.fromkeys(tokens) if token not in vocab]
    if new:
        from tokenizers import AddedToken

        # Rows beyond the tokenizer's length are padding that was never trained: keep them out of the mean.
        trained = min(embedding_rows(model), max(vocab.values()) + 1)
        pieces = [tokenizer(token, add_special_tokens=False)["input_ids"] for token in new]
        if special:
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
        else:
            tokenizer.add_tokens(new)
        vocab = tokenizer.get_vocab()
        new_ids = [vocab[token] for token in new]
        old_rows = embedding_rows(model)
        _grow(model, max(old_rows, max(new_ids) + 1))
        _init_rows(model, new_ids, trained_rows=trained, init=init, pieces=pieces)
        mark_for_training(model, new_ids)
        rows = embedding_rows(model)
        resized = f"grew the embeddings {old_rows} -> {rows} rows" if rows > old_rows else f"used spare rows of {rows}"
        report(
            "new_tokens",
            f"{len(new)} tokens not in the vocabulary ({preview(new)})",
            f"added them as ids {new_ids[0]}..{new_ids[-1]}, {resized}, set their rows by {init} and marked them "
            "for training",
        )
    return [vocab[token] for token in tokens]


def _grow(model, rows: int) -> None:
    if rows > embedding_rows(model):
        # mean_resizing samples rows around the mean; they are overwritten right after, so skip that work.
        model.resize_token_embeddings(rows, mean_resizing=False)


def _init_rows(model, token_ids: list[int], trained_rows: int, init: str, pieces: list[list[int]] | None) -> None:
    import torch

    with torch.no_grad():
        for _, weight in embedding_matrices(model):
            mean = weight[:trained_rows].float().mean(dim=0)
            for index, token_id in enumerate(token_ids):
                row = mean
                known = [p for p in (pieces[index] if pieces else []) if p < trained_rows]
                if init == "interpolation" and known:
                    row = 0.5 * mean + 0.5 * weight[known].float().mean(dim=0)
                weight[token_id] = row.to(weight.dtype)
