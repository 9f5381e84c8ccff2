"""Padding on the right for training and on the left for generation."""

from __future__ import annotations

from swiftune_tokenizers_fix._validate import require_fast_tokenizer
from swiftune_tokenizers_fix.report import Repair, report

_PURPOSE = {"right": "training", "left": "generation"}


def set_padding_side(tokenizer, side: str) -> Repair | None:
    """Set ``tokenizer.padding_side`` to ``side`` and report the change.

    Training pads on the right so that every sample starts at position 0 and its labels line up with its tokens
    whatever the batch. Generation pads on the left so that every prompt ends at the last position, where the new
    token is appended; right padding there makes the model continue after pad tokens.

    Args:
        tokenizer: a fast tokenizer, changed in place.
        side: ``"right"`` (training) or ``"left"`` (generation).

    Returns:
        The repair, or None when the side was already ``side``.

    Raises:
        ValueError: ``side`` is neither ``"right"`` nor ``"left"``.
    """
    require_fast_tokenizer(tokenizer, "set_padding_side")
    if side not in _PURPOSE:
        raise ValueError(f"padding side must be 'right' (training) or 'left' (generation), got {side!r}.")
    old = tokenizer.padding_side
    if old == side:
        return None
    tokenizer.padding_side = side
    return report("padding_side", f"padding side {old!r}", f"set it to {side!r} for {_PURPOSE[side]}")


def for_training(tokenizer) -> Repair | None:
    """Pad on the right, as training needs. See :func:`set_padding_side`."""
    return set_padding_side(tokenizer, "right")


def for_generation(tokenizer) -> Repair | None:
    """Pad on the left, as batched generation needs. See :func:`set_padding_side`."""
    return set_padding_side(tokenizer, "left")
