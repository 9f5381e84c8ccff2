"""Preference data (prompt / chosen / rejected) as prompt messages plus chosen and rejected assistant messages."""

from __future__ import annotations

from datasets import Dataset

from swiftune_data.formats import normalize_messages

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def standardize_preference(dataset: Dataset) -> Dataset:
    """Turn preference data into columns ``prompt``, ``chosen`` and ``rejected`` of ``{"role", "content"}`` messages.

    Each of ``prompt``, ``chosen`` and ``rejected`` may be a string or a list of messages (OpenAI content strings or
    lists of parts). Without a ``prompt`` column, ``chosen`` and ``rejected`` must be whole conversations: their
    common leading messages become the prompt (the "implicit prompt" layout).

    Raises:
        ValueError: the columns are missing, a prompt does not end with a user turn, or a chosen/rejected answer is
            empty or holds a turn that is not the assistant's.
    """
    columns = dataset.column_names
    if "chosen" not in columns or "rejected" not in columns:
        raise ValueError(
            f"Preference data needs the columns chosen and rejected (and usually prompt); found {sorted(columns)}."
        )
    return dataset.map(preference_row, remove_columns=columns)


def preference_row(row: dict) -> dict:
    """One preference row as ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` of messages."""
    if row.get("prompt") is not None:
        prompt = _as_messages(row["prompt"], "user")
        chosen, rejected = _as_messages(row["chosen"], "assistant"), _as_messages(row["rejected"], "assistant")
    else:
        chosen, rejected = _as_messages(row["chosen"], "assistant"), _as_messages(row["rejected"], "assistant")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        # The answers are the trailing assistant turns where the two conversations part.
        while shared > 0 and chosen[shared - 1]["role"] == "assistant":
            shared -= 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError(
            f"A preference prompt must end with a user turn, got roles {[m['role'] for m in prompt]}; "
            "put the question in 'prompt' and only the answers in 'chosen' and 'rejected'."
        )
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or any(m["role"] != "assistant" for m in answer):
            raise ValueError(
                f"A '{name}' answer must be one or more assistant turns, got roles {[m['role'] for m in answer]}."
            )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return normalize_messages(value)
    raise ValueError(f"Expected a string or a list of messages in preference data, got {type(value).__name__}.")
