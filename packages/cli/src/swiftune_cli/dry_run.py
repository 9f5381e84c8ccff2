"""``swiftune train --dry-run``: check every part of a run without training, and print a short report.

Each check runs even when an earlier one failed (where it does not need the earlier result), so that one dry run
shows every problem. The exit status is 1 when any check failed.
"""

from __future__ import annotations

import math

from swiftune_cli.memory_estimate import FIT_SHARE, device_memory, estimate_training_memory, format_gib
from swiftune_cli.model_facts import format_count

# Rows tokenized for the length statistics: enough to see the spread, quick on any dataset.
LENGTH_SAMPLE_ROWS = 256
UNTRUNCATED = 10**9


class _Report:
    def __init__(self):
        self.problems: list[str] = []

    def check(self, name: str, action):
        """Run ``action`` (returns (line, value)); print an ok or FAIL line; return the value or None."""
        try:
            line, value = action()
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the other checks run
            from swiftune_cli.main import error_sentence

            message = error_sentence(error)
            self.problems.append(f"{name}: {message}")
            print(f"  FAIL  {name:<10} {message}", flush=True)
            return None
        print(f"  ok    {name:<10} {line}", flush=True)
        return value


def run_dry_run(config: dict) -> int:
    """Check the settings, model, tokenizer, dataset, chat template, LoRA targets and memory; returns 0 when all pass.

    Raises:
        ValueError: after the report, when a check failed (the message counts the problems and names the first).
    """
    print("dry run of swiftune train (nothing is loaded onto the device, nothing is trained)")
    report = _Report()
    report.check("settings", lambda: _check_settings(config))
    facts = report.check("model", lambda: _check_model(config))
    tokenizer = report.check("tokenizer", lambda: _check_tokenizer(config, facts)) if facts else None
    conversations = report.check("dataset", lambda: _check_dataset(config))
    longest = None
    if tokenizer is not None and conversations is not None:
        longest = report.check("template", lambda: _check_template(config, tokenizer, conversations))
    lora = report.check("lora", lambda: _check_lora(config, facts)) if facts else None
    if facts is not None and (lora is not None or config["full_finetuning"]):
        report.check("memory", lambda: _check_memory(config, facts, lora or 0, longest))
    if conversations is not None:
        report.check("steps", lambda: _check_steps(config, len(conversations)))
    if report.problems:
        count = len(report.problems)
        raise ValueError(f"the dry run found {count} problem{'s' if count > 1 else ''}; first, {report.problems[0]}")
    print("dry run passed: run the same command without --dry-run to train.")
    return 0


def _check_settings(config: dict):
    from swiftune_cli.config_schema import check_settings
    from swiftune_cli.train_job import build_job, resolve_checkpoint
    from swiftune_train import check_output_dir

    check_settings(config)
    check_output_dir(config["output_dir"])
    build_job(config, callbacks=[])  # refuses settings the installed swiftune-train cannot apply
    checkpoint = resolve_checkpoint(config["resume_from_checkpoint"], config["output_dir"])
    resume = f"; resumes from {checkpoint}" if checkpoint else ""
    return f"all keys valid; output to {config['output_dir']}{resume}", True


def _check_model(config: dict):
    from swiftune_cli.model_facts import read_model_facts

    facts = read_model_facts(config["model"])
    fast = "yes" if facts.fast_path else "no (plain transformers)"
    quant = f", stored {facts.quantization}" if facts.quantization else ""
    line = (
        f"{facts.path}: {facts.model_type} ({facts.architecture}), fast path: {fast}, "
        f"{format_count(facts.parameters)} parameters, stored {facts.stored_dtype}{quant}"
    )
    if facts.max_positions and config["max_seq_length"] > facts.max_positions:
        line += (
            f"; RoPE stretched from its {facts.max_positions} positions to max_seq_length {config['max_seq_length']}"
        )
    return line, facts


def _check_tokenizer(config: dict, facts):
    from transformers import AutoTokenizer

    from swiftune_data import get_chat_template, registered_template_of

    tokenizer = AutoTokenizer.from_pretrained(facts.path)
    if config["chat_template"] is not None:
        get_chat_template(tokenizer, config["chat_template"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set chat_template to a registered name, e.g. chatml.")
    spec = registered_template_of(tokenizer)
    template = spec.name if spec is not None else "the model's own (not a registered one)"
    return f"{len(tokenizer)} tokens, chat template: {template}", tokenizer


def _check_dataset(config: dict):
    from swiftune_cli.train_job import check_dataset_format
    from swiftune_data import bundled_dataset_path, detect_format, load_dataset_file, standardize

    check_dataset_format(config["dataset"], config["dataset_format"])
    path = config["dataset"] if config["dataset"] is not None else bundled_dataset_path("train")
    raw = load_dataset_file(path)
    conversations = standardize(raw)
    return f"{path}: {len(raw)} rows, format {detect_format(raw.column_names)}", conversations


def _check_template(config: dict, tokenizer, conversations):
    from swiftune_data import IGNORE_INDEX, tokenize_conversations

    sample = conversations.select(range(min(LENGTH_SAMPLE_ROWS, len(conversations))))
    # Untruncated, to see how long the rows are; training cuts them at max_seq_length.
    tokenized = tokenize_conversations(sample, tokenizer, UNTRUNCATED, config["train_on_responses_only"])
    first_ids = tokenized[0]["input_ids"]
    first_labels = tokenized[0]["labels"][: config["max_seq_length"]]
    trained = sum(label != IGNORE_INDEX for label in first_labels)
    if trained == 0:
        raise ValueError(
            f"the first example has no trained token within max_seq_length={config['max_seq_length']}; raise it, "
            "or check that the chat template marks assistant turns."
        )
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    over = sum(length > config["max_seq_length"] for length in lengths)
    line = (
        f"first example renders to {len(first_ids)} tokens, {trained} trained; first {len(lengths)} rows: longest "
        f"{max(lengths)}, mean {sum(lengths) / len(lengths):.0f} tokens, {over} over max_seq_length"
    )
    return line, max(lengths)


def _check_lora(config: dict, facts):
    from swiftune_cli.model_facts import lora_parameter_count

    if config["full_finetuning"]:
        return f"none (full fine-tuning: all {format_count(facts.parameters)} parameters train)", 0
    count, targets = lora_parameter_count(facts, config["lora_r"], config["target_modules"])
    share = 100 * count / max(facts.parameters, 1)
    return (
        f"r={config['lora_r']} on {', '.join(targets)}: {format_count(count)} trainable parameters ({share:.2f}%)",
        count,
    )


def _check_memory(config: dict, facts, lora_parameters: int, longest: int | None):
    import torch

    from swiftune_loader.precision import resolve_dtype

    dtype = str(resolve_dtype(config["dtype"])).removeprefix("torch.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpointing = config["gradient_checkpointing"]
    checkpointing = device == "cuda" if checkpointing is None else checkpointing
    # Batches are padded to their longest row, so rows shorter than max_seq_length take less; packed rows are full.
    length = (
        config["max_seq_length"] if config["packing"] or longest is None else min(longest, config["max_seq_length"])
    )
    sized = {**config, "max_seq_length": length}
    estimate = estimate_training_memory(facts, sized, lora_parameters, dtype, device, checkpointing)
    free, where = device_memory()
    parts = (
        f"weights {format_gib(estimate.weights)}, trainable state {format_gib(estimate.trainable_state)}, "
        f"activations {format_gib(estimate.activations)}, overhead {format_gib(estimate.overhead)}"
    )
    shape = f"{dtype}, {config['batch_size']} x {length} tokens"
    line = f"~{format_gib(estimate.total)} ({parts}; {shape}) of {format_gib(free)} {where}"
    if estimate.total > FIT_SHARE * free:
        raise ValueError(
            f"{line}: it may not fit; lower batch_size or max_seq_length, turn on gradient_checkpointing, "
            "or load_in_4bit."
        )
    return line + ": fits", estimate


def _check_steps(config: dict, rows: int):
    per_step = config["batch_size"] * config["gradient_accumulation_steps"]
    if config["max_steps"] > 0:
        steps = config["max_steps"]
    else:
        steps = math.ceil(rows / per_step) * config["num_train_epochs"]
    epochs = steps * per_step / rows
    return f"{steps:.0f} optimizer steps of {per_step} sequences (~{epochs:.1f} passes over the data)", steps
