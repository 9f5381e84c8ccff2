"""What a repair found and did, logged as exactly one line."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("swiftune_tokenizers_fix")


@dataclass(frozen=True)
class Repair:
    """One repair applied to a tokenizer or a model.

    Attributes:
        kind: which repair ran, e.g. ``"pad_token"`` or ``"double_bos"``.
        found: the defect, in words a user can check.
        did: what was changed to repair it.
    """

    kind: str
    found: str
    did: str

    def __str__(self) -> str:
        return f"{self.kind}: found {self.found}; {self.did}."


def report(kind: str, found: str, did: str) -> Repair:
    """Record a repair and log it as one WARNING line on the ``swiftune_tokenizers_fix`` logger.

    A repair changes what the model trains on, so it is logged at WARNING: a user must see it without turning on
    debug output. Line breaks are escaped so that each repair stays one line in any log.
    """
    repair = Repair(kind, _one_line(found), _one_line(did))
    logger.warning("%s", repair)
    return repair


def preview(items, limit: int = 5) -> str:
    """The first ``limit`` items as reprs, then "..." when there are more: long token lists stay readable."""
    items = list(items)
    return ", ".join(map(repr, items[:limit])) + (", ..." if len(items) > limit else "")


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")
