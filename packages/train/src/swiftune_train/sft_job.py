"""The main job: LoRA fine-tuning of a causal LM on a conversation dataset, from files to a saved adapter.

It goes through each package's public API: the loader loads the model and adds LoRA, the data package reads,
standardizes and tokenizes the conversations, TRL's SFTTrainer trains, and the adapter is saved atomically.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from swiftune_data import load_conversations, tokenize_conversations
from swiftune_loader import FastLanguageModel, chat_reply
from swiftune_tokenizers_fix import fix_tokenizer
from swiftune_train.arguments import sft_config
from swiftune_train.callbacks import LossCurveCallback
from swiftune_train.progress import ProgressPrinter

logger = logging.getLogger(__name__)


@dataclass
class SFTJob:
    """What to fine-tune, on what, and how. None for model or dataset means the bundled default.

    Attributes:
        model: a local model folder, or None for the bundled SmolLM2-135M-Instruct.
        dataset: a local dataset file (JSONL/JSON/CSV/Parquet), or None for the bundled Quillhaven set.
        output_dir: the adapter is written to ``output_dir/adapter``.
        max_seq_length: longest training sequence, in tokens.
        max_steps: optimizer steps; a positive number overrides ``num_train_epochs``.
        num_train_epochs: passes over the data when ``max_steps`` is not set.
        batch_size: sequences per device step.
        gradient_accumulation_steps: device steps per optimizer step.
        learning_rate: peak learning rate.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        train_on_responses_only: compute the loss on assistant turns only.
        gradient_checkpointing: recompute activations in backward (saves memory, costs time).
        load_in_4bit: QLoRA on an NF4-quantized base.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``["embed_tokens", "lm_head"]``
            to teach new tokens).
        embedding_learning_rate: learning rate of the trained embeddings and lm_head; None: ``learning_rate``.
        report_to: integrations to report to (``["tensorboard"]``, ``["wandb"]``); none by default. TensorBoard
            event files are written to ``output_dir/runs``.
        dtype: weight dtype ("bfloat16", "float16", "float32"); None chooses for the device.
        seed: random seed of the run.
        probe_questions: questions answered before and after training, to show what was learned.
        extra_args: any other ``SFTConfig`` field.
        callbacks: extra ``TrainerCallback`` objects (e.g. a progress bar), added after the job's own.
    """

    model: str | None = None
    dataset: str | None = None
    output_dir: str = "swiftune-output"
    max_seq_length: int = 512
    max_steps: int = -1
    num_train_epochs: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 16
    train_on_responses_only: bool = True
    gradient_checkpointing: bool = True
    load_in_4bit: bool = False
    modules_to_save: list[str] | None = None
    embedding_learning_rate: float | None = None
    report_to: list[str] = field(default_factory=list)
    dtype: str | None = None
    seed: int = 3407
    probe_questions: list[str] = field(default_factory=list)
    extra_args: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)


@dataclass
class SFTResult:
    """What a finished job produced: where the adapter and the loss curve are, the loss history, and the probe
    answers."""

    adapter_dir: Path
    losses: list[tuple[int, float]]
    answers_before: list[str]
    answers_after: list[str]
    loss_curve: Path | None = None

    @property
    def first_loss(self) -> float:
        """Mean loss of the first logged steps (up to 5)."""
        head = [loss for _, loss in self.losses[:5]]
        return sum(head) / len(head)

    @property
    def last_loss(self) -> float:
        """Mean loss of the last logged steps (up to 5)."""
        tail = [loss for _, loss in self.losses[-5:]]
        return sum(tail) / len(tail)


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Refuse an output path that is an existing file, before any work is done."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Output path '{path}' is an existing file; pass a folder (it will be created).")
    return path


def run_sft_job(job: SFTJob, write=print) -> SFTResult:
    """Fine-tune with LoRA as ``job`` describes and save the adapter (and tokenizer) to ``output_dir/adapter``.

    Bad input (a missing model or dataset, a dataset without the needed fields, an output path that is a file)
    raises before any training or writing starts.

    Args:
        job: the job description.
        write: where progress lines go.

    Returns:
        The :class:`SFTResult`.
    """
    from transformers import PrinterCallback

    from swiftune_data import bundled_dataset_path
    from swiftune_train.trainer import SFTTrainer

    output_dir = check_output_dir(job.output_dir)
    dataset_path = job.dataset if job.dataset is not None else bundled_dataset_path("train")
    conversations = load_conversations(dataset_path)
    model, tokenizer = FastLanguageModel.from_pretrained(
        job.model, max_seq_length=job.max_seq_length, load_in_4bit=job.load_in_4bit, dtype=job.dtype
    )
    _, repairs = fix_tokenizer(tokenizer, model)
    for repair in repairs:
        write(f"tokenizer repair ({repair.kind}): {repair.did}")
    tokenized = tokenize_conversations(conversations, tokenizer, job.max_seq_length, job.train_on_responses_only)
    write(f"model {model.config._name_or_path} ({model.num_parameters() / 1e6:.0f}M parameters, {model.dtype})")
    write(f"data {dataset_path}: {len(tokenized)} conversations")

    answers_before = [chat_reply(model, tokenizer, q) for q in job.probe_questions]
    model = FastLanguageModel.get_peft_model(
        model,
        r=job.lora_r,
        lora_alpha=job.lora_alpha,
        use_gradient_checkpointing=job.gradient_checkpointing,
        random_state=job.seed,
        modules_to_save=job.modules_to_save,
    )
    trainable, total = model.get_nb_trainable_parameters()
    write(f"LoRA r={job.lora_r}: {trainable / 1e6:.2f}M trainable parameters of {total / 1e6:.0f}M")

    progress = ProgressPrinter(write)
    loss_curve = LossCurveCallback(output_dir / "loss_curve.png")
    with tempfile.TemporaryDirectory(prefix="swiftune-trainer-") as scratch:
        args = sft_config(
            scratch,
            model_dtype=model.dtype,
            gradient_checkpointing=job.gradient_checkpointing,
            per_device_train_batch_size=job.batch_size,
            gradient_accumulation_steps=job.gradient_accumulation_steps,
            learning_rate=job.learning_rate,
            max_steps=job.max_steps,
            num_train_epochs=job.num_train_epochs,
            max_length=job.max_seq_length,
            seed=job.seed,
            embedding_learning_rate=job.embedding_learning_rate,
            report_to=list(job.report_to) or "none",
            **job.extra_args,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=tokenized,
            processing_class=tokenizer,
            callbacks=[progress, loss_curve, *job.callbacks],
        )
        # Our progress lines replace the raw log dicts transformers prints when tqdm is off.
        trainer.remove_callback(PrinterCallback)
        try:
            trainer.train()
        finally:
            # TensorBoard writes under the trainer's scratch folder; keep its event files, even of a failed run.
            _keep_folder(Path(scratch) / "runs", output_dir / "runs")
    if progress.non_finite_loss is not None:
        raise FloatingPointError(
            f"Training stopped: the loss became {progress.non_finite_loss}. Nothing was saved; lower the learning rate "
            "or check the data for broken examples."
        )
    if not progress.losses:
        raise RuntimeError("Training ran no logged step; check max_steps and the dataset size.")

    answers_after = [chat_reply(model, tokenizer, q) for q in job.probe_questions]
    adapter_dir = save_adapter(model, tokenizer, output_dir / "adapter")
    return SFTResult(adapter_dir, progress.losses, answers_before, answers_after, loss_curve.written)


def _keep_folder(source: Path, target: Path) -> None:
    if not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        destination = target / entry.name
        if destination.exists():
            shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
        shutil.move(str(entry), destination)


def save_adapter(model, tokenizer, adapter_dir: str | os.PathLike) -> Path:
    """Save a peft model's adapter and the tokenizer so that the folder appears complete or not at all."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}.", dir=adapter_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        staging.rename(adapter_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return adapter_dir
