"""``swiftune train``: LoRA fine-tuning; with no argument, the bundled model on the bundled dataset."""

from __future__ import annotations

import argparse

# With no argument the job must finish on a 2-core CPU in a few minutes, and still show learning.
DEFAULT_MAX_STEPS = 30
DEFAULT_LEARNING_RATE = 1e-3


def add_parser(commands) -> None:
    """Register the ``train`` subcommand."""
    p = commands.add_parser(
        "train",
        help="fine-tune a model with LoRA",
        description="Fine-tune a model with LoRA. With no argument: the bundled SmolLM2-135M-Instruct on the bundled "
        "Quillhaven dataset, with its answers to held-out questions shown before and after.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="local model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="dataset file: .jsonl/.json/.csv/.parquet (default: bundled)")
    p.add_argument("--output-dir", default="swiftune-output", help="the adapter goes to OUTPUT_DIR/adapter")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="optimizer steps (-1: use --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --max-steps is -1")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: quantize the base to NF4")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default: per device")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in backward (default: on with a GPU, off on the CPU)",
    )
    p.add_argument("--all-tokens", action="store_true", help="train on prompts too, not only on assistant answers")
    p.add_argument(
        "--question",
        action="append",
        default=None,
        help="question to answer before and after training (repeatable; default: two held-out ones)",
    )
    p.add_argument("--seed", type=int, default=3407)
    p.set_defaults(run=run)


def run(args) -> int:
    """Run the fine-tuning job and print what it learned."""
    import torch

    from swiftune_train import SFTJob, check_output_dir, run_sft_job

    check_output_dir(args.output_dir)
    questions = args.question if args.question is not None else _default_questions(args.data)
    checkpointing = (
        args.gradient_checkpointing if args.gradient_checkpointing is not None else torch.cuda.is_available()
    )
    job = SFTJob(
        model=args.model,
        dataset=args.data,
        output_dir=args.output_dir,
        max_seq_length=args.max_seq_length,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        train_on_responses_only=not args.all_tokens,
        gradient_checkpointing=checkpointing,
        load_in_4bit=args.load_in_4bit,
        dtype=args.dtype,
        seed=args.seed,
        probe_questions=questions,
    )
    result = run_sft_job(job)
    print(f"\nloss: {result.first_loss:.3f} (first steps) -> {result.last_loss:.3f} (last steps)")
    for question, before, after in zip(questions, result.answers_before, result.answers_after, strict=True):
        print(f"\nQ: {question}\n  before: {before}\n  after:  {after}")
    print(f"\nadapter saved to {result.adapter_dir}")
    print(f"next: swiftune export --adapter {result.adapter_dir} --out {result.adapter_dir.parent / 'merged'}")
    return 0


def _default_questions(data: str | None) -> list[str]:
    """Two held-out questions of the bundled dataset when training on it; none for the user's own data."""
    if data is not None:
        return []
    import json

    from swiftune_data import bundled_dataset_path

    with open(bundled_dataset_path("test"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [rows[i]["messages"][0]["content"] for i in (6, 11)]
