"""The options of ``swiftune train``, stated once: argparse flags and YAML config keys are both made from this table.

A key is spelled with underscores in YAML (``learning_rate: 2.0e-4``) and with dashes as a flag
(``--learning-rate 2e-4``). This module imports nothing heavy: ``swiftune --help`` builds its parser from it.
"""

from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import dataclass

GROUPS = ("loading", "lora", "data", "training")
DTYPES = ("bfloat16", "float16", "float32")
DATASET_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "preference")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
# With no argument the job must finish on a 2-core CPU in a few minutes, and still show learning.
DEFAULT_MAX_STEPS = 30
DEFAULT_LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class Option:
    """One setting of ``swiftune train``.

    Attributes:
        key: the YAML key and the argparse destination; the flag is ``--`` + key with dashes.
        kind: ``str``, ``int``, ``float``, ``bool`` or ``list`` (of strings).
        default: the value when neither the config file nor a flag sets it; None means "decided at run time".
        help: one line for ``--help``.
        group: one of ``GROUPS``.
        aliases: further flag spellings (e.g. ``--data`` for ``--dataset``).
        choices: the allowed values, when they are a closed set.
        nullable: None is an allowed value (in YAML: ``null``).
        repeat: a list flag given once per item (items may hold commas) instead of comma-separated.
        false_flag: an extra flag that sets a bool option to False.
        true_means: for a str option: the value that YAML ``true`` (and the flag given without a value) stands
            for; YAML ``false`` then means null.
    """

    key: str
    kind: type
    default: object
    help: str
    group: str
    aliases: tuple[str, ...] = ()
    choices: tuple | None = None
    nullable: bool = False
    repeat: bool = False
    false_flag: str | None = None
    true_means: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    # loading
    Option(
        "model", str, None, "local model folder (null: the bundled SmolLM2-135M-Instruct)", "loading", nullable=True
    ),
    Option("max_seq_length", int, 512, "longest training sequence, in tokens", "loading"),
    Option(
        "dtype", str, None, "weight dtype (null: bfloat16 on a GPU, float32 on the CPU)", "loading", (), DTYPES, True
    ),
    Option("load_in_4bit", bool, False, "QLoRA: quantize the base to NF4", "loading"),
    Option("load_in_8bit", bool, False, "quantize the base to int8", "loading"),
    Option("full_finetuning", bool, False, "train every weight instead of LoRA adapters", "loading"),
    Option(
        "gradient_checkpointing",
        bool,
        None,
        "recompute activations in backward (null: on with a GPU, off on the CPU)",
        "loading",
        nullable=True,
    ),
    # lora
    Option("lora_r", int, 16, "LoRA rank", "lora", ("--r",)),
    Option("lora_alpha", int, 16, "LoRA scaling numerator", "lora"),
    Option("lora_dropout", float, 0.0, "dropout on the adapter input", "lora"),
    Option(
        "target_modules",
        list,
        None,
        "layers to adapt, comma-separated, or all-linear (null: attention and MLP projections)",
        "lora",
        nullable=True,
    ),
    Option("use_rslora", bool, False, "rank-stabilised LoRA scaling (alpha / sqrt(r))", "lora", ("--rslora",)),
    # data
    Option(
        "dataset", str, None, "dataset file .jsonl/.json/.csv/.parquet (null: bundled)", "data", ("--data",), None, True
    ),
    Option(
        "dataset_format",
        str,
        None,
        "the dataset's format (null: detected from its columns)",
        "data",
        ("--format",),
        DATASET_FORMATS,
        True,
    ),
    Option(
        "chat_template",
        str,
        None,
        "a registered chat template name, e.g. chatml, llama-3.1 (null: the tokenizer's own)",
        "data",
        ("--template",),
        nullable=True,
    ),
    Option(
        "train_on_responses_only",
        bool,
        True,
        "compute the loss on assistant answers only",
        "data",
        false_flag="--all-tokens",
    ),
    Option("packing", bool, False, "pack several short samples into each sequence", "data"),
    # training
    Option("max_steps", int, DEFAULT_MAX_STEPS, "optimizer steps (-1: use num_train_epochs)", "training"),
    Option("num_train_epochs", float, 1.0, "passes over the data when max_steps is -1", "training", ("--epochs",)),
    Option("batch_size", int, 8, "sequences per device step", "training"),
    Option("gradient_accumulation_steps", int, 1, "device steps per optimizer step", "training", ("--grad-accum",)),
    Option("learning_rate", float, DEFAULT_LEARNING_RATE, "peak learning rate", "training", ("--lr",)),
    Option(
        "embedding_learning_rate",
        float,
        None,
        "learning rate of trained embeddings and lm_head (null: learning_rate)",
        "training",
        nullable=True,
    ),
    Option("warmup_steps", float, 0.05, "warmup steps (a number below 1 is a fraction of all steps)", "training"),
    Option("lr_scheduler_type", str, "linear", "learning-rate schedule", "training", ("--scheduler",), SCHEDULERS),
    Option("seed", int, 3407, "random seed", "training"),
    Option("output_dir", str, "swiftune-output", "the adapter goes to OUTPUT_DIR/adapter", "training"),
    Option("save_steps", int, 0, "write a checkpoint every N steps (0: none)", "training"),
    Option(
        "resume_from_checkpoint",
        str,
        None,
        "a checkpoint folder to resume from, or 'last' (also: the flag alone, YAML true) for the newest in OUTPUT_DIR",
        "training",
        ("--resume",),
        nullable=True,
        true_means="last",
    ),
    Option(
        "num_gpus",
        int,
        1,
        "GPUs to train on; above 1 the run is relaunched under torchrun, one process per GPU",
        "training",
    ),
    Option(
        "report_to",
        list,
        [],
        "where metrics go as well, comma-separated: tensorboard, wandb, ... (empty: nowhere)",
        "training",
    ),
    Option(
        "questions",
        list,
        None,
        "questions answered before and after training (null: two held-out ones with the bundled dataset)",
        "training",
        ("--question",),
        nullable=True,
        repeat=True,
    ),
)
OPTIONS_BY_KEY = {option.key: option for option in OPTIONS}


def defaults() -> dict:
    """Every key with its default value (lists copied)."""
    return {o.key: list(o.default) if isinstance(o.default, list) else o.default for o in OPTIONS}


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option, grouped; flags that are not given leave no attribute (so a file's value stays)."""
    groups = {name: parser.add_argument_group(f"{name} options") for name in GROUPS}
    for option in OPTIONS:
        group = groups[option.group]
        names = (option.flag, *option.aliases)
        common = dict(dest=option.key, default=argparse.SUPPRESS, help=f"{option.help} [default: {option.default}]")
        if option.kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
            if option.false_flag:
                group.add_argument(
                    option.false_flag,
                    dest=option.key,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help=f"same as --no-{option.flag[2:]}",
                )
        elif option.kind is list and option.repeat:
            group.add_argument(*names, action="append", metavar="TEXT", **common)
        elif option.kind is list:
            group.add_argument(*names, type=_comma_list, metavar="A,B,...", **common)
        elif option.true_means is not None:
            group.add_argument(
                *names, type=_flag_parser(option), nargs="?", const=option.true_means, metavar="VALUE", **common
            )
        else:
            metavar = "{" + ",".join(option.choices) + "}" if option.choices else option.kind.__name__.upper()
            group.add_argument(*names, type=_flag_parser(option), metavar=metavar, **common)


def validated(mapping: dict, source: str) -> dict:
    """Check the keys and values of ``mapping`` (a config file's content) and return them coerced to their kinds.

    Raises:
        ValueError: an unknown key (naming the closest valid key) or a value of the wrong kind.
    """
    result = {}
    for key, value in mapping.items():
        option = OPTIONS_BY_KEY.get(str(key))
        if option is None:
            raise ValueError(f"{source}: unknown key {key!r}{_suggestion(str(key))}")
        result[option.key] = coerce(option, value, source)
    return result


def coerce(option: Option, value, source: str):
    """``value`` as the option's kind, or a ValueError that names the key, the value and what is expected."""
    where = f"{source}: {option.key}"
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and option.nullable):
        if option.nullable:
            return None
        raise ValueError(f"{where} must not be null; expected {_expected(option)}.")
    if option.kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}.")
    if option.true_means is not None and isinstance(value, bool):
        return option.true_means if value else None
    if option.kind is list:
        items = _comma_list(value) if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError(f"{where} must be a list of strings, got {value!r}.")
        return items
    converted = _scalar(option, value)
    if converted is None:
        raise ValueError(f"{where} must be {_expected(option)}, got {value!r}.")
    if option.choices and converted not in option.choices:
        raise ValueError(
            f"{where} is {converted!r}; choose one of {', '.join(option.choices)}{_close(converted, option.choices)}"
        )
    return converted


def _scalar(option: Option, value):
    """int/float/str conversion that refuses bools and lossy casts; None when the value does not fit."""
    if isinstance(value, bool):
        return None
    if option.kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        return None
    if option.kind is float:
        # YAML 1.1 reads 2e-4 (no dot) as a string, so numbers written that way are accepted here.
        try:
            return float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            return None
    return value if isinstance(value, str) else None


def _expected(option: Option) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list of strings"}
    return names[option.kind] + (" or null" if option.nullable else "")


def _flag_parser(option: Option):
    def parse(text: str):
        try:
            return coerce(option, text, "command line")
        except ValueError as error:  # argparse turns this into a usage error (exit 2) naming the flag
            raise argparse.ArgumentTypeError(str(error).removeprefix("command line: ")) from None

    parse.__name__ = option.kind.__name__
    return parse


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _suggestion(key: str) -> str:
    normalized = key.replace("-", "_").lower()
    aliases = {alias[2:].replace("-", "_"): o.key for o in OPTIONS for alias in o.aliases}
    if normalized in OPTIONS_BY_KEY or normalized in aliases:
        return f"; did you mean {aliases.get(normalized, normalized)!r}?"
    match = difflib.get_close_matches(normalized, [*OPTIONS_BY_KEY, *aliases], n=1, cutoff=0.5)
    if match:
        return f"; did you mean {aliases.get(match[0], match[0])!r}?"
    return f"; valid keys: {', '.join(OPTIONS_BY_KEY)}."


def _close(value: str, choices) -> str:
    match = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else "."


def check_settings(config: dict) -> None:
    """Refuse settings that cannot work together, before anything is loaded.

    Raises:
        ValueError: one sentence naming the keys at fault and what to change.
    """
    for key in ("max_seq_length", "batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha", "num_gpus"):
        if config[key] <= 0:
            raise ValueError(f"{key} must be a positive integer, got {config[key]}.")
    if not 0.0 <= config["lora_dropout"] < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {config['lora_dropout']}.")
    for key in ("learning_rate", "embedding_learning_rate"):
        # A NaN compares False both ways, so "<= 0" alone would let it through.
        if config[key] is not None and not (config[key] > 0 and math.isfinite(config[key])):
            raise ValueError(f"{key} must be a positive finite number, got {config[key]}.")
    if config["warmup_steps"] < 0 or config["save_steps"] < 0:
        raise ValueError("warmup_steps and save_steps must not be negative.")
    if config["max_steps"] == 0 or (config["max_steps"] < 0 and config["num_train_epochs"] <= 0):
        raise ValueError(
            "Nothing to train: set max_steps to a positive number, or max_steps: -1 with num_train_epochs > 0."
        )
    if config["load_in_4bit"] and config["load_in_8bit"]:
        raise ValueError("Choose one of load_in_4bit and load_in_8bit, not both.")
    if config["full_finetuning"] and (config["load_in_4bit"] or config["load_in_8bit"]):
        raise ValueError(
            "full_finetuning trains every weight and cannot use quantized weights; drop load_in_4bit/8bit."
        )
