"""Padding-free packing: several samples per row, and no token attends to, or predicts, another sample's tokens.

Within a row, ``position_ids`` restart at 0 for each sample, and each sample's first label is -100 (otherwise the
previous sample's last token would be trained to predict it). Attention is kept inside each sample either by
varlen metadata (``cu_seq_lens_q/k`` and ``max_length_q/k``, read by flash-attention style kernels) or by an
explicit 4-D block-diagonal causal mask for sdpa and eager attention. transformers' sdpa and eager paths also derive
a block mask from position ids that restart, but only when no KV cache is built (``use_cache=False``): with those
kernels, prefer the explicit mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swiftune_data.tokenize import IGNORE_INDEX

ATTENTION_MODES = ("varlen", "block_causal")
# Fields of vision examples: packing concatenates token ids only, so the images would be dropped or misaligned.
_IMAGE_FIELDS = ("pixel_values", "images", "image", "image_grid_thw")


def pack_sequences(examples: Sequence[dict], max_length: int | None = None) -> list[dict]:
    """Pack tokenized examples, in order, into rows of at most ``max_length`` ids.

    Args:
        examples: dicts with ``input_ids`` and optionally ``labels`` (the ids themselves when absent).
        max_length: the most ids per row; None puts every example in one row.

    Returns:
        One dict per row with ``input_ids``, ``labels``, ``position_ids`` and ``seq_lengths`` (lists).

    Raises:
        ValueError: an example carries images (packing is for text only), is empty, its labels differ in length
            from its ids, or it is longer than ``max_length`` (truncate when tokenizing, e.g.
            ``tokenize_conversations(..., max_length=...)``).
    """
    rows: list[dict] = []
    current = _empty_row()
    for index, example in enumerate(examples):
        image_fields = [name for name in _IMAGE_FIELDS if example.get(name) is not None]
        if image_fields:
            raise ValueError(
                f"Example {index} carries images ({', '.join(image_fields)}), and packing joins token ids only; turn "
                "packing off for vision models."
            )
        ids = list(example["input_ids"])
        labels = list(example["labels"]) if example.get("labels") is not None else list(ids)
        if not ids or len(labels) != len(ids):
            raise ValueError(
                f"Example {index} has {len(ids)} input ids and {len(labels)} labels; both must be equal and non-zero."
            )
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"Example {index} has {len(ids)} ids, more than max_length={max_length}; truncate it when tokenizing."
            )
        if max_length is not None and current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            rows.append(current)
            current = _empty_row()
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX] + labels[1:]
        current["position_ids"] += list(range(len(ids)))
        current["seq_lengths"].append(len(ids))
    if current["input_ids"]:
        rows.append(current)
    return rows


def block_causal_mask(seq_lengths: Sequence[Sequence[int]], length: int, dtype=None):
    """Additive 4-D mask ``(rows, 1, length, length)``: 0 where a token may attend, the dtype's minimum elsewhere.

    A token attends to itself and the earlier tokens of its own segment only. ``seq_lengths`` lists each row's
    segments; a row's remaining positions (padding) form one more segment, so that no attention row is empty
    (an all-masked row gives NaN in softmax).
    """
    import torch

    dtype = dtype or torch.float32
    segment = torch.empty(len(seq_lengths), length, dtype=torch.long)
    for row, lengths in enumerate(seq_lengths):
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths)))
        segment[row] = torch.cat([ids, torch.full((length - len(ids),), len(lengths), dtype=torch.long)])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@dataclass
class DataCollatorForPackedSequences:
    """Collate tokenized examples into packed rows with no attention or prediction across samples.

    Attributes:
        max_length: the most ids per row; None packs the whole batch into one row (padding-free).
        attention: ``"varlen"`` returns ``cu_seq_lens_q/k`` and ``max_length_q/k`` for flash-attention style
            kernels (sdpa and eager build the same block mask from ``position_ids`` only with ``use_cache=False``);
            ``"block_causal"`` returns a 4-D additive ``attention_mask`` for sdpa and eager attention.
        pad_token_id: fills rows shorter than the longest row.
        mask_dtype: dtype of the 4-D mask; use the model's dtype (sdpa needs them to match).

    The batch holds ``input_ids``, ``labels`` and ``position_ids`` of shape ``(rows, length)`` plus the attention
    fields above. Padding is labeled -100 and, in the varlen metadata, forms its own segments.
    """

    max_length: int | None = None
    attention: str = "varlen"
    pad_token_id: int = 0
    mask_dtype: object = None

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1 or None, got {self.max_length}.")

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        if not features:
            raise ValueError("Cannot collate an empty batch.")
        rows = pack_sequences(features, self.max_length)
        length = max(len(row["input_ids"]) for row in rows)

        def padded(key: str, fill: int):
            return torch.tensor([row[key] + [fill] * (length - len(row[key])) for row in rows], dtype=torch.long)

        batch = {
            "input_ids": padded("input_ids", self.pad_token_id),
            "labels": padded("labels", IGNORE_INDEX),
            "position_ids": torch.tensor(
                [row["position_ids"] + list(range(length - len(row["input_ids"]))) for row in rows], dtype=torch.long
            ),
        }
        if self.attention == "block_causal":
            batch["attention_mask"] = block_causal_mask([row["seq_lengths"] for row in rows], length, self.mask_dtype)
            return batch
        # Varlen kernels see the rows flattened end to end; each row's padding is one more (ignored) segment.
        segments = []
        for row in rows:
            segments += row["seq_lengths"]
            if len(row["input_ids"]) < length:
                segments.append(length - len(row["input_ids"]))
        cu_seq_lens = torch.cumsum(torch.tensor([0, *segments]), dim=0, dtype=torch.int32)
        batch.update(
            cu_seq_lens_q=cu_seq_lens,
            cu_seq_lens_k=cu_seq_lens,
            max_length_q=max(segments),
            max_length_k=max(segments),
        )
        return batch


def _empty_row() -> dict:
    return {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
