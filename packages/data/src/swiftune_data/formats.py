"""Recognising dataset formats and turning each into OpenAI-style ``messages``."""

from __future__ import annotations

from datasets import Dataset

# format name -> the columns that identify it
KNOWN_FORMATS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
}


def detect_format(column_names: list[str]) -> str:
    """Name the format whose identifying columns are present.

    Raises:
        ValueError: no known format fits; the message names the columns found and the formats known.
    """
    for name, needed in KNOWN_FORMATS.items():
        if all(column in column_names for column in needed):
            return name
    known = "; ".join(f"{name} ({', '.join(cols)})" for name, cols in KNOWN_FORMATS.items())
    hint = " Raw text (a 'text' column) is not a conversation: use chunk_text()." if "text" in column_names else ""
    raise ValueError(f"No known dataset format fits the columns {sorted(column_names)}. Known formats: {known}.{hint}")


def standardize(dataset: Dataset) -> Dataset:
    """Turn a dataset in any known format into one column ``messages`` of {"role", "content"} dicts.

    Preference data becomes its prompt followed by the chosen answer (supervised fine-tuning on the preferred
    replies); :func:`swiftune_data.standardize_preference` keeps both answers. Raw text has no turns: chunk it with
    :func:`swiftune_data.chunk_text` instead.

    Raises:
        ValueError: the format is unknown, or a row has no assistant turn or an unknown role.
    """
    fmt = detect_format(dataset.column_names)
    convert = {
        "messages": _from_messages,
        "sharegpt": _from_sharegpt,
        "alpaca": _from_alpaca,
        "prompt_completion": _from_prompt_completion,
        "preference": _from_preference,
    }[fmt]
    return dataset.map(lambda row: {"messages": _validated(convert(row))}, remove_columns=dataset.column_names)


def _validated(messages: list[dict]) -> list[dict]:
    for index, message in enumerate(messages):
        if not message["content"].strip():
            raise ValueError(
                f"A conversation has an empty {message['role']} turn (turn {index + 1} of {len(messages)}): an empty "
                "turn trains the model to answer with nothing; remove the turn or fill it."
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            "A conversation has no assistant turn, so there is nothing to learn from it: "
            f"{[m['role'] for m in messages]}."
        )
    return messages


def _content_text(content) -> str:
    # OpenAI content can be a list of parts; text parts are joined.
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _from_messages(row: dict) -> list[dict]:
    return normalize_messages(row["messages"])


def normalize_messages(raw: list[dict]) -> list[dict]:
    """OpenAI-style messages as ``{"role", "content"}`` dicts with string content (text parts joined).

    Raises:
        ValueError: a role is not system, user or assistant.
    """
    messages = []
    for message in raw:
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"Unknown role {role!r} in a messages row; use system, user or assistant.")
        messages.append({"role": role, "content": _content_text(message.get("content"))})
    return messages


def _from_sharegpt(row: dict) -> list[dict]:
    messages = []
    for turn in row["conversations"]:
        speaker = turn.get("from")
        if speaker not in _SHAREGPT_ROLES:
            raise ValueError(f"Unknown ShareGPT speaker {speaker!r}; use human, gpt or system.")
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": str(turn.get("value", ""))})
    return messages


def _from_alpaca(row: dict) -> list[dict]:
    instruction = str(row["instruction"])
    extra = row.get("input")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]


def _from_prompt_completion(row: dict) -> list[dict]:
    return [{"role": "user", "content": str(row["prompt"])}, {"role": "assistant", "content": str(row["completion"])}]


def _from_preference(row: dict) -> list[dict]:
    # Imported here: preference.py builds on this module's message helpers.
    from swiftune_data.preference import preference_row

    pair = preference_row(row)
    return pair["prompt"] + pair["chosen"]
