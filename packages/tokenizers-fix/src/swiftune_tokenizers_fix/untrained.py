"""Embedding rows that were never trained (all near zero) for tokens that the chat template or the data use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from swiftune_tokenizers_fix._validate import require_fast_tokenizer, require_model
from swiftune_tokenizers_fix.chat_template import render_chat, template_token_ids
from swiftune_tokenizers_fix.embeddings import embedding_matrices, mark_for_training
from swiftune_tokenizers_fix.report import preview, report

# A row counts as never trained when its largest entry is this small compared with a typical row's largest entry.
# Relative, so that it holds for any dtype and initialisation scale; trained rows sit within ~10x of the median.
UNTRAINED_RELATIVE_SIZE = 1e-3


def untrained_rows(weight):
    """Boolean mask of the rows of an embedding matrix that were never trained (all entries near zero)."""
    size = weight.detach().abs().amax(dim=1).float()
    # The median of the non-zero rows, so that a vocabulary with many zero rows still has a trained scale.
    nonzero = size[size > 0]
    scale = nonzero.median() if nonzero.numel() else size.new_zeros(())
    return size <= scale * UNTRAINED_RELATIVE_SIZE


def fix_untrained_tokens(model, tokenizer, dataset=None) -> list[int]:
    """Set never-trained embedding rows that will be used to the mean of the trained rows.

    Base models ship rows for chat tokens they never saw (a Llama 3 base has all-zero rows for ``<|eot_id|>``);
    fine-tuning a chat template on them starts from a zero vector whose logit cannot rise the way the others do, and
    the loss spikes or the model never emits the token. Rows of tokens that are used - in the chat template, as
    BOS/EOS, or in ``dataset`` - are set to the mean of the trained rows, in the input embeddings and in a separate
    lm_head, and marked for training. Untrained rows that nothing uses (padding of the vocabulary) are left alone.

    Args:
        model: a transformers model, changed in place.
        tokenizer: a fast tokenizer.
        dataset: optional rows (a list or a ``datasets.Dataset``) holding ``input_ids``, ``messages`` (rendered with
            the chat template) or ``text``, or plain strings.

    Returns:
        The token ids whose rows were set, sorted.

    Raises:
        ValueError: every row is zero (the weights did not load), or a dataset row has none of the fields above.
    """
    import torch

    require_model(model, "fix_untrained_tokens")
    require_fast_tokenizer(tokenizer, "fix_untrained_tokens")
    used = template_token_ids(tokenizer) | _data_token_ids(tokenizer, dataset)
    used |= {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
    fixed: set[int] = set()
    counts, unused = [], 0
    with torch.no_grad():
        for name, weight in embedding_matrices(model):
            untrained = untrained_rows(weight)
            if bool(untrained.all()):
                raise ValueError(
                    f"Every row of the model's {name} is zero: the weights did not load. Reload the model."
                )
            targets = sorted(i for i in used if 0 <= i < weight.shape[0] and bool(untrained[i]))
            if targets:
                weight[targets] = weight[~untrained].float().mean(dim=0).to(weight.dtype)
                counts.append(f"{len(targets)} {name} rows")
            fixed.update(targets)
            unused = max(unused, int(untrained.sum()) - len(targets))
    if not fixed:
        return []
    mark_for_training(model, fixed)
    report(
        "untrained_tokens",
        f"never-trained embedding rows for {len(fixed)} used tokens "
        f"({preview(tokenizer.convert_ids_to_tokens(sorted(fixed)))})",
        f"set {' and '.join(counts)} to the mean of the trained rows and marked them for training"
        f" ({unused} unused untrained rows left as they are)",
    )
    return sorted(fixed)


def _data_token_ids(tokenizer, dataset) -> set[int]:
    if dataset is None:
        return set()
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "input_ids" in columns:
        rows: Iterable = ({"input_ids": ids} for ids in dataset["input_ids"])  # one column read, not row by row
    else:
        rows = dataset
    ids: set[int] = set()
    for row in rows:
        if isinstance(row, str):
            ids.update(tokenizer(row)["input_ids"])
        elif isinstance(row, Mapping) and "input_ids" in row:
            ids.update(_flatten(row["input_ids"]))
        elif isinstance(row, Mapping) and "messages" in row:
            text = render_chat(tokenizer, list(row["messages"]))
            if text is None:
                raise ValueError("The chat template cannot render a row's messages; check the roles and contents.")
            ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif isinstance(row, Mapping) and "text" in row:
            ids.update(tokenizer(row["text"])["input_ids"])
        else:
            raise ValueError(
                "Each dataset row must be a string or hold 'input_ids', 'messages' or 'text'; "
                f"got {type(row).__name__} {list(row)[:5] if isinstance(row, Mapping) else ''}."
            )
    return ids


def _flatten(values) -> list[int]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, int):
        return [values]
    return [i for value in values for i in _flatten(value)]
