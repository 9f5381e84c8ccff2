"""The main job: LoRA fine-tuning of a causal LM on a conversation dataset, from files to a saved adapter.

It goes through each package's public API: the loader loads the model (16-bit, 4-bit or 8-bit) and adds LoRA (or
trains every weight), the data package reads, standardizes, templates, tokenizes and packs the conversations, TRL's
SFTTrainer trains (writing checkpoints and resuming from one when asked), and the result is saved atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from swiftune_data import get_chat_template, load_conversations, tokenize_conversations
from swiftune_loader import FastLanguageModel, chat_reply, resolve_model_path
from swiftune_loader.staged_folder import staged_folder
from swiftune_tokenizers_fix import fix_tokenizer
from swiftune_train.arguments import sft_config
from swiftune_train.callbacks import InterruptCallback, LossCurveCallback
from swiftune_train.progress import ProgressPrinter

logger = logging.getLogger(__name__)

# Spellings of resume_from_checkpoint that mean "the newest checkpoint-N in output_dir".
RESUME_LATEST = ("true", "last", "latest")


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
        lora_dropout: dropout on the adapter input (0 keeps swiftune's fused LoRA kernels usable).
        target_modules: names of the layers to adapt, or "all-linear"; None: the attention and MLP projections.
        use_rslora: rank-stabilised scaling, lora_alpha / sqrt(r) instead of lora_alpha / r.
        train_on_responses_only: compute the loss on assistant turns only.
        chat_template: a registered chat template name (``swiftune_data.CHAT_TEMPLATES``, e.g. "llama-3.1") to
            render the conversations with; None: the tokenizer's own.
        packing: pack several samples into each row of ``max_seq_length`` tokens (swiftune_data's padding-free
            collator: positions restart and no token attends to another sample).
        gradient_checkpointing: recompute activations in backward (saves memory, costs time).
        load_in_4bit: QLoRA on an NF4-quantized base.
        load_in_8bit: LoRA on an int8-quantized base.
        full_finetuning: train every weight instead of LoRA adapters; the full model is saved to
            ``output_dir/model`` (the LoRA options are then unused).
        save_steps: write a checkpoint to ``output_dir/checkpoint-N`` every this many steps; 0: none.
        resume_from_checkpoint: continue a run from a checkpoint folder; True, "true" or "last" take the newest
            ``checkpoint-N`` in ``output_dir``; None starts afresh.
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
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    train_on_responses_only: bool = True
    chat_template: str | None = None
    packing: bool = False
    gradient_checkpointing: bool = True
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    full_finetuning: bool = False
    save_steps: int = 0
    resume_from_checkpoint: str | bool | None = None
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
    """What a finished job produced: where the adapter (or, with full fine-tuning, the full model) and the loss
    curve are, the loss history, and the probe answers."""

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


def resolve_checkpoint(value: str | bool | os.PathLike | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder that ``resume_from_checkpoint`` names, or None to start afresh.

    Args:
        value: None or False (start afresh); True, "true", "last" or "latest" (the newest ``checkpoint-N`` folder
            in ``output_dir``); or a checkpoint folder.
        output_dir: the job's output folder, where its checkpoints are written.

    Raises:
        FileNotFoundError: the folder does not exist, or ``output_dir`` holds no checkpoint to resume from.
    """
    if value is None or value is False:
        return None
    if value is True or str(value).strip().lower() in RESUME_LATEST:
        folder = Path(output_dir).expanduser()
        numbered = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
        if not numbered:
            raise FileNotFoundError(
                f"No checkpoint-N folder to resume from in '{folder}'; train with save_steps > 0 first, or pass the "
                "checkpoint folder itself."
            )
        return str(max(numbered, key=lambda p: int(p.name[11:])))
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint folder '{path}' does not exist; pass a checkpoint-N folder or 'last'.")
    return str(path)


def run_sft_job(job: SFTJob, write=print) -> SFTResult:
    """Fine-tune as ``job`` describes and save the adapter (and tokenizer) to ``output_dir/adapter``, or with
    ``full_finetuning`` the full model to ``output_dir/model``.

    Bad input (a missing model, dataset or checkpoint, a dataset without the needed fields, an unknown chat
    template, an output path that is a file) raises before any training or writing starts.

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
    if job.packing:
        refuse_packing_for_vision(job.model)
    checkpoint = resolve_checkpoint(job.resume_from_checkpoint, output_dir)
    if job.model is not None:
        resolve_model_path(job.model, load_in_4bit=job.load_in_4bit)  # a wrong model fails before the data loads
    dataset_path = job.dataset if job.dataset is not None else bundled_dataset_path("train")
    conversations = load_conversations(dataset_path)
    model, tokenizer = FastLanguageModel.from_pretrained(
        job.model,
        max_seq_length=job.max_seq_length,
        load_in_4bit=job.load_in_4bit,
        load_in_8bit=job.load_in_8bit,
        full_finetuning=job.full_finetuning,
        use_gradient_checkpointing=job.gradient_checkpointing,
        dtype=job.dtype,
        device_map=_process_device_map(),
    )
    if job.chat_template is not None:
        # Before the repairs: tokens the template adds make the embeddings grow there.
        get_chat_template(tokenizer, job.chat_template)
        write(f"chat template: {job.chat_template}")
    _, repairs = fix_tokenizer(tokenizer, model)
    for repair in repairs:
        write(f"tokenizer repair ({repair.kind}): {repair.did}")
    tokenized = tokenize_conversations(conversations, tokenizer, job.max_seq_length, job.train_on_responses_only)
    write(f"model {model.config._name_or_path} ({model.num_parameters() / 1e6:.0f}M parameters, {model.dtype})")
    write(f"data {dataset_path}: {len(tokenized)} conversations" + (", packed" if job.packing else ""))

    answers_before = [chat_reply(model, tokenizer, q) for q in job.probe_questions]
    model = _trainable_model(model, job, write)
    progress = ProgressPrinter(write)
    loss_curve = LossCurveCallback(output_dir / "loss_curve.png")
    # Checkpoints must outlive the run, so they go to output_dir; otherwise the trainer's files are scratch.
    keeps_checkpoints = job.save_steps > 0
    with tempfile.TemporaryDirectory(prefix="swiftune-trainer-") as scratch:
        trainer_dir = output_dir if keeps_checkpoints else Path(scratch)
        checkpoint_args = {"save_strategy": "steps", "save_steps": job.save_steps} if keeps_checkpoints else {}
        args = sft_config(
            str(trainer_dir),
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
            **{**checkpoint_args, **job.extra_args},
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=tokenized,
            processing_class=tokenizer,
            data_collator=_packing_collator(model, tokenizer, job.max_seq_length) if job.packing else None,
            callbacks=[progress, loss_curve, *job.callbacks],
        )
        # Our progress lines replace the raw log dicts transformers prints when tqdm is off.
        trainer.remove_callback(PrinterCallback)
        if checkpoint is not None:
            write(f"resuming from {checkpoint}")
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        finally:
            # TensorBoard writes under the trainer's folder; keep its event files, even of a failed run.
            stopped_at = _interrupted_step(trainer)
            if trainer_dir != output_dir:
                _keep_folder(trainer_dir / "runs", output_dir / "runs")
                # The Ctrl-C checkpoint is the point of the interrupt: it must outlive the scratch folder.
                if stopped_at is not None:
                    name = f"checkpoint-{stopped_at}"
                    _keep_folder(trainer_dir / name, output_dir / name)
        if stopped_at is not None:
            write(
                f"interrupted after step {stopped_at}: checkpoint saved to {output_dir / f'checkpoint-{stopped_at}'}; "
                "resume with resume_from_checkpoint='last' (swiftune train --resume)"
            )
    if progress.non_finite_loss is not None:
        raise FloatingPointError(
            f"Training stopped: the loss became {progress.non_finite_loss}. Nothing was saved; lower the learning rate "
            "or check the data for broken examples."
        )
    if not progress.losses:
        raise RuntimeError("Training ran no logged step; check max_steps and the dataset size.")

    answers_after = [chat_reply(model, tokenizer, q) for q in job.probe_questions]
    target = output_dir / ("model" if job.full_finetuning else "adapter")
    # Under torchrun every rank holds the same weights; one writes them.
    saved = save_adapter(model, tokenizer, target) if trainer.is_world_process_zero() else target
    return SFTResult(saved, progress.losses, answers_before, answers_after, loss_curve.written)


# Vision-language model types whose config may come without a nested vision_config (defaults fill it in).
_VISION_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "mllama", "llava", "llava_next", "gemma3", "paligemma"})


def refuse_packing_for_vision(model: str | os.PathLike | None) -> None:
    """Refuse packing for a vision-language model folder, read from its config.json before anything loads.

    Packing concatenates token rows; image features are attached per sample and cannot follow them.

    Raises:
        ValueError: the folder's config describes a vision-language model.
    """
    if model is None:
        return
    config_file = Path(model).expanduser() / "config.json"
    if not config_file.is_file():
        return  # the loader gives the error for a missing folder
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the loader reports an unreadable config
    if "vision_config" in config or config.get("model_type") in _VISION_MODEL_TYPES:
        raise ValueError(
            f"packing cannot be used with vision models ('{model}' is one): images belong to single samples; "
            "train without packing."
        )


def _interrupted_step(trainer) -> int | None:
    """The step after which Ctrl-C stopped training, or None when it ran to its end."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, InterruptCallback) and callback.interrupted_at is not None:
            return callback.interrupted_at
    return None


def _process_device_map():
    """Under torchrun each process holds its replica on its own GPU (LOCAL_RANK); else the loader's default."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or not torch.cuda.is_available():
        return None
    return {"": int(local_rank)}


def _trainable_model(model, job: SFTJob, write):
    """The model with LoRA adapters as ``job`` asks, or unchanged (every weight trains) with full fine-tuning."""
    if job.full_finetuning:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        write(f"full fine-tuning: {trainable / 1e6:.2f}M trainable parameters")
        return model
    model = FastLanguageModel.get_peft_model(
        model,
        r=job.lora_r,
        lora_alpha=job.lora_alpha,
        lora_dropout=job.lora_dropout,
        target_modules=job.target_modules,
        use_rslora=job.use_rslora,
        use_gradient_checkpointing=job.gradient_checkpointing,
        random_state=job.seed,
        modules_to_save=job.modules_to_save,
    )
    trainable, total = model.get_nb_trainable_parameters()
    write(f"LoRA r={job.lora_r}: {trainable / 1e6:.2f}M trainable parameters of {total / 1e6:.0f}M")
    return model


def _packing_collator(model, tokenizer, max_length: int):
    """swiftune_data's packing collator, with the attention metadata the model's attention kernel reads."""
    from swiftune_data import DataCollatorForPackedSequences

    kernel = str(getattr(model.config, "_attn_implementation", None) or "")
    # Flash-attention kernels read the varlen boundaries; sdpa and eager need the explicit block mask.
    attention = "varlen" if "flash" in kernel else "block_causal"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForPackedSequences(
        max_length=max_length, attention=attention, pad_token_id=pad, mask_dtype=model.dtype
    )


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
    """Save a peft model's adapter (or a plain model in full, as safetensors) and the tokenizer so that the folder
    appears complete or not at all."""
    adapter_dir = Path(adapter_dir)
    with staged_folder(adapter_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return adapter_dir
