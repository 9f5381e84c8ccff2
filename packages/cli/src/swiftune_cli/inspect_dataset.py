"""``swiftune inspect --dataset``: the format detected, one example rendered with its chat template and the trained
span marked, and token counts, exactly as training would tokenize it."""

from __future__ import annotations

import sys

# Rows tokenized for the length statistics.
SAMPLE_ROWS = 256
ANSI_TRAINED = ("\x1b[1;32m", "\x1b[0m")
BRACKETS = ("[[", "]]")


def inspect_dataset(args, model_name) -> int:
    """Print how ``args.dataset`` is read and rendered for training with the tokenizer of ``model_name``."""
    from transformers import AutoTokenizer

    from swiftune_data import (
        IGNORE_INDEX,
        detect_format,
        get_chat_template,
        load_dataset_file,
        registered_template_of,
        standardize,
        tokenize_conversations,
    )
    from swiftune_loader import resolve_model_path

    raw = load_dataset_file(args.dataset)
    fmt = detect_format(raw.column_names)
    if not 0 <= args.example < len(raw):
        raise ValueError(f"--example {args.example} is out of range: the dataset has {len(raw)} rows.")
    model_path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if args.template is not None:
        get_chat_template(tokenizer, args.template)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"The tokenizer of '{model_path}' has no chat template; pass --template NAME (e.g. chatml).")
    spec = registered_template_of(tokenizer)
    template = spec.name if spec is not None else "the model's own"
    conversations = standardize(raw)
    rows = sorted({args.example, *range(min(SAMPLE_ROWS, len(raw)))})
    tokenized = tokenize_conversations(
        conversations.select(rows), tokenizer, args.max_seq_length, train_on_responses_only=not args.all_tokens
    )
    example = tokenized[rows.index(args.example)]
    ids, labels = example["input_ids"], example["labels"]
    trained = [label != IGNORE_INDEX for label in labels]
    lengths = [len(row) for row in tokenized["input_ids"]]
    marks = _marks(args.color)

    print(f"dataset   {args.dataset}: {len(raw)} rows, format {fmt} (columns: {', '.join(raw.column_names)})")
    print(f"template  {template} (tokenizer of {model_path})")
    legend = "colored" if marks is ANSI_TRAINED else "inside [[ ]]"
    print(f"\nexample {args.example}, as the model sees it (the trained tokens {legend}):\n")
    print(marked_text(tokenizer, ids, trained, marks))
    print(f"\ntokens    {len(ids)} ({sum(trained)} trained, {len(ids) - sum(trained)} masked)")
    print(
        f"lengths   first {len(lengths)} rows: mean {sum(lengths) / len(lengths):.0f}, longest {max(lengths)} tokens "
        f"(max_seq_length {args.max_seq_length})"
    )
    return 0


def marked_text(tokenizer, ids: list[int], trained: list[bool], marks: tuple[str, str]) -> str:
    """Decode ``ids`` with each run of trained tokens wrapped in ``marks`` (special tokens written out)."""
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(f"{marks[0]}{text}{marks[1]}" if trained[start] else text)
            start = end
    return "".join(pieces)


def _marks(color: str) -> tuple[str, str]:
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    return ANSI_TRAINED if use_color else BRACKETS
