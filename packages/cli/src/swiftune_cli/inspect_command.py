"""``swiftune inspect``: what a model folder holds, or what a dataset becomes once formatted for training."""

from __future__ import annotations

import argparse
import logging


def add_parser(commands, parents=()) -> None:
    """Register the ``inspect`` subcommand."""
    p = commands.add_parser(
        "inspect",
        parents=list(parents),
        help="show what a model folder holds, or how a dataset is formatted",
        description="With MODEL_DIR: its architecture, whether swiftune's fast path applies, parameters, dtype, "
        "quantization and the tokenizer repairs that training would apply (nothing is saved). With --dataset: the "
        "format detected, the first example rendered with the chat template with the trained span marked, and "
        "token counts.",
    )
    p.add_argument("model_dir", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--dataset", "--data", default=None, metavar="FILE", help="inspect this dataset file instead")
    p.add_argument("--model", default=None, help="model whose tokenizer renders the dataset (same as MODEL_DIR)")
    p.add_argument("--template", "--chat-template", default=None, help="a registered chat template name")
    p.add_argument("--max-seq-length", type=int, default=512, help="tokens kept per example, as in training")
    p.add_argument("--all-tokens", action="store_true", help="train on prompts too (default: answers only)")
    p.add_argument("--example", type=int, default=0, help="which example to render (0: the first)")
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="mark the trained span with color (on a terminal) or with [[ ]] brackets",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Inspect a model folder, or a dataset."""
    if args.model_dir is not None and args.model is not None and args.model_dir != args.model:
        raise ValueError("Give the model once: as MODEL_DIR or as --model, not both.")
    model = args.model if args.model is not None else args.model_dir
    if args.dataset is not None:
        from swiftune_cli.inspect_dataset import inspect_dataset

        return inspect_dataset(args, model)
    if args.template is not None:
        raise ValueError("--template applies to --dataset; add --dataset FILE.")
    return inspect_model(model)


def inspect_model(model_name) -> int:
    """Print the facts of a model folder and the tokenizer repairs that would apply."""
    from transformers import AutoTokenizer

    from swiftune_cli.model_facts import format_count, meta_model, read_model_facts
    from swiftune_data import registered_template_of

    facts = read_model_facts(model_name)
    tokenizer = AutoTokenizer.from_pretrained(facts.path)
    spec = registered_template_of(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        template = "none (pass a registered template to train)"
    else:
        template = spec.name if spec is not None else "the model's own (not a registered one)"
    rows = [
        ("model", str(facts.path)),
        ("architecture", f"{facts.architecture} (model_type {facts.model_type})"),
        ("fast path", "yes: swiftune's kernels apply on a GPU" if facts.fast_path else "no: plain transformers"),
        ("parameters", f"{format_count(facts.parameters)} ({facts.parameters:,})"),
        ("shape", f"{facts.num_layers} layers, hidden {facts.hidden_size}, vocabulary {facts.vocab_size}"),
        ("context", f"{facts.max_positions} positions" if facts.max_positions else "not stated in config.json"),
        ("dtype", f"{facts.stored_dtype} (as stored)"),
        ("quantization", facts.quantization or "none"),
        ("tokenizer", f"{len(tokenizer)} tokens, chat template: {template}"),
    ]
    repairs = tokenizer_repairs(tokenizer, meta_model(facts.path))
    rows.append(("repairs", "none needed" if not repairs else f"{len(repairs)} would apply when training:"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for repair in repairs:
        print(f"{'':<{width}}  - {repair}")
    return 0


def tokenizer_repairs(tokenizer, model) -> list:
    """The repairs ``fix_tokenizer`` would make, found on this tokenizer object (a fresh load, never saved) and on
    a model on the meta device; their log lines are held back since they are printed as the result."""
    from swiftune_tokenizers_fix import fix_tokenizer

    log = logging.getLogger("swiftune_tokenizers_fix")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        _, repairs = fix_tokenizer(tokenizer, model)
    finally:
        log.setLevel(level)
    return repairs
