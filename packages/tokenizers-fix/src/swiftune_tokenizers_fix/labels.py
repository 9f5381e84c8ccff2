"""Checking that a tokenized dataset has labels left to learn from."""

from __future__ import annotations

import math
from collections.abc import Mapping

from swiftune_tokenizers_fix.report import logger

IGNORE_INDEX = -100
WARN_ABOVE = 0.9


def check_labels(dataset, warn_above: float = WARN_ABOVE) -> float:
    """Raise when every label is masked (-100), and warn when more than ``warn_above`` of them are.

    All labels at -100 means the loss is zero and the model learns nothing: the response markers used for masking
    do not occur in the text the chat template renders, or every sample was truncated before its answer. A share
    above 90% usually means long prompts or system messages and very short answers: training works but learns
    slowly.

    Args:
        dataset: rows holding ``labels`` (a list or a ``datasets.Dataset``), or one batch: a mapping whose
            ``labels`` is a list of lists or a 2-D tensor.
        warn_above: the masked share above which one warning line is logged.

    Returns:
        The share of labels that are -100.

    Raises:
        ValueError: no labels at all, a row without ``labels``, or every label is -100.
    """
    if isinstance(dataset, Mapping):
        if "labels" not in dataset:
            raise ValueError(_NO_LABELS.format(keys=list(dataset)[:8]))
        rows = dataset["labels"]
    else:
        columns = getattr(dataset, "column_names", None)
        if columns is not None and "labels" not in columns:
            raise ValueError(_NO_LABELS.format(keys=columns[:8]))
        # A datasets.Dataset reads one column at once; a list of rows is read row by row.
        rows = dataset["labels"] if columns is not None else (_labels_of(row) for row in dataset)
    total = masked = 0
    for labels in rows:
        row_total, row_masked = _count(labels)
        total, masked = total + row_total, masked + row_masked
    if total == 0:
        raise ValueError("The dataset has no labels at all (it is empty, or every sample is empty); check the data.")
    share = masked / total
    if masked == total:
        raise ValueError(
            f"Every one of the {total} labels is -100, so the loss is zero and the model learns nothing. The "
            "response-only masking did not find the assistant turns in the rendered text: check that the chat "
            "template matches the one used for masking, and that max_length keeps the answers."
        )
    if share > warn_above:
        logger.warning(
            "labels: %.1f%% of the %d labels are -100 (masked); only %d tokens train. Check that masking keeps the "
            "assistant turns and that max_length does not cut them off.",
            100 * share,
            total,
            total - masked,
        )
    return share


_NO_LABELS = (
    "The dataset has no 'labels' (it holds {keys}); tokenize it with labels first, e.g. with "
    "swiftune_data.tokenize_conversations."
)


def _labels_of(row):
    if not isinstance(row, Mapping) or "labels" not in row:
        keys = list(row)[:8] if isinstance(row, Mapping) else type(row).__name__
        raise ValueError(_NO_LABELS.format(keys=keys))
    return row["labels"]


def _count(labels) -> tuple[int, int]:
    """(number of labels, number at -100) of one sample, a list or a tensor, counted without a Python loop."""
    if hasattr(labels, "shape"):  # a torch tensor or a numpy array
        return math.prod(labels.shape), int((labels == IGNORE_INDEX).sum())
    if isinstance(labels, int):
        return 1, int(labels == IGNORE_INDEX)
    if labels and not isinstance(labels[0], int):
        counts = [_count(part) for part in labels]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
    return len(labels), list(labels).count(IGNORE_INDEX)
