"""Training arguments: TRL's configs with ``embedding_learning_rate`` and defaults that suit LoRA on any machine.

``SwiftuneArguments`` holds the shared fields and defaults once; ``SFTConfig``, ``DPOConfig``, ``ORPOConfig``,
``KTOConfig`` and ``GRPOConfig`` put it in front of TRL's class of the same name, so that every TRL field keeps
working and only these defaults change.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field

import torch
from transformers.training_args import OptimizerNames
from trl import DPOConfig as _TRLDPOConfig
from trl import GRPOConfig as _TRLGRPOConfig
from trl import KTOConfig as _TRLKTOConfig
from trl import SFTConfig as _TRLSFTConfig

AUTO = "auto"


def default_optimizer(cuda_available: bool, bitsandbytes_available: bool) -> str:
    """The optimizer name (transformers' ``optim``) chosen when the user picks none.

    bitsandbytes' 8-bit AdamW keeps the optimizer state in a quarter of the memory on a GPU; without bitsandbytes
    a GPU gets torch's fused AdamW. On the CPU, where memory is rarely the limit and bitsandbytes' CPU path is slow,
    plain torch AdamW.

    Args:
        cuda_available: a CUDA device is usable.
        bitsandbytes_available: the ``bitsandbytes`` package can be imported.
    """
    if not cuda_available:
        return OptimizerNames.ADAMW_TORCH.value
    return OptimizerNames.ADAMW_8BIT.value if bitsandbytes_available else OptimizerNames.ADAMW_TORCH_FUSED.value


def _default_optimizer_here() -> str:
    return default_optimizer(torch.cuda.is_available(), importlib.util.find_spec("bitsandbytes") is not None)


@dataclass
class SwiftuneArguments:
    """Fields and defaults that swiftune adds to every TRL config (a mixin: use the config classes below).

    Defaults: learning rate 2e-4, linear schedule with a 5% warmup, 8-bit AdamW on a GPU with bitsandbytes
    (``optim="auto"``, see :func:`default_optimizer`), logging every step with a NaN loss reported as NaN, no
    external reporting unless ``report_to`` names it, and mixed precision only where it runs: bf16 on a GPU that
    supports it, none on the CPU (``bf16=None``, ``use_cpu=None`` and ``dataloader_pin_memory=None`` are decided
    from the device).
    """

    embedding_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the trained input embeddings and lm_head (e.g. peft modules_to_save copies), "
            "in their own optimizer group without weight decay. None: the same learning rate as everything else."
        },
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (2e-4 suits LoRA)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning rate schedule."})
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Warmup steps, or a fraction in [0, 1) of the total steps."}
    )
    optim: OptimizerNames | str = field(
        default=AUTO,
        metadata={"help": "Optimizer name; 'auto' picks 8-bit AdamW on a GPU with bitsandbytes, else torch AdamW."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every this many optimizer steps."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP searches the graph for parameters without gradients each step when True; LoRA trains every "
            "adapter in every step, so the search only costs time (transformers turns it on for peft models)."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "Replace a NaN/inf loss by the running mean in the logs (hides failures)."}
    )
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Integrations to report to ('tensorboard', 'wandb', ...); none by default."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; None: on a GPU that supports it, unless fp16 is set."}
    )
    use_cpu: bool | None = field(default=None, metadata={"help": "Train on the CPU; None: when no GPU is usable."})
    dataloader_pin_memory: bool | None = field(
        default=None, metadata={"help": "Pin batches in page-locked memory; None: on a GPU only."}
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward (transformers' older name of activation_checkpointing)."},
    )

    def __post_init__(self):
        on_gpu = torch.cuda.is_available()
        if self.optim == AUTO:
            self.optim = _default_optimizer_here()
        if self.use_cpu is None:
            self.use_cpu = not on_gpu
        if self.bf16 is None:
            # transformers refuses bf16 mixed precision on the CPU; TRL would default it on everywhere.
            self.bf16 = not self.fp16 and on_gpu and not self.use_cpu and torch.cuda.is_bf16_supported()
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = on_gpu and not self.use_cpu
        self._resolve_checkpointing()
        if self.embedding_learning_rate is not None and not self.embedding_learning_rate > 0:
            raise ValueError(
                f"embedding_learning_rate must be a positive number or None, got {self.embedding_learning_rate!r}."
            )
        super().__post_init__()

    def _resolve_checkpointing(self):
        # Both names are accepted without transformers' deprecation warning; the new name wins when both are set.
        # Checkpointing stays on by default, as in TRL.
        if "activation_checkpointing" not in self.__dataclass_fields__:
            self.gradient_checkpointing = True if self.gradient_checkpointing is None else self.gradient_checkpointing
            return
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing is not False
        self.gradient_checkpointing = None  # transformers mirrors it from activation_checkpointing


@dataclass
class SFTConfig(SwiftuneArguments, _TRLSFTConfig):
    """TRL's ``SFTConfig`` with swiftune's defaults and ``embedding_learning_rate`` (see :class:`SwiftuneArguments`)."""


@dataclass
class DPOConfig(SwiftuneArguments, _TRLDPOConfig):
    """TRL's ``DPOConfig`` with swiftune's defaults and ``embedding_learning_rate`` (see :class:`SwiftuneArguments`)."""


@dataclass
class KTOConfig(SwiftuneArguments, _TRLKTOConfig):
    """TRL's ``KTOConfig`` with swiftune's defaults and ``embedding_learning_rate`` (see :class:`SwiftuneArguments`)."""


@dataclass
class GRPOConfig(SwiftuneArguments, _TRLGRPOConfig):
    """TRL's ``GRPOConfig`` with swiftune's defaults and ``embedding_learning_rate`` (see :class:`SwiftuneArguments`).

    Note TRL's GRPOConfig ``learning_rate`` default (1e-6, for full fine-tuning) is replaced by 2e-4 like the others.
    """


def _build_orpo_config() -> type:
    # TRL keeps ORPO under trl.experimental, whose import warns; it is built on first use so that importing
    # swiftune_train neither pays for it nor prints the warning.
    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        from trl.experimental.orpo import ORPOConfig as _TRLORPOConfig

    @dataclass
    class ORPOConfig(SwiftuneArguments, _TRLORPOConfig):
        """TRL's ``ORPOConfig`` with swiftune's defaults and ``embedding_learning_rate`` (see
        :class:`SwiftuneArguments`)."""

    ORPOConfig.__module__ = __name__
    ORPOConfig.__qualname__ = "ORPOConfig"
    return ORPOConfig


def __getattr__(name: str):
    if name == "ORPOConfig":
        globals()[name] = _build_orpo_config()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sft_config(
    output_dir: str, model_dtype: torch.dtype | None = None, gradient_checkpointing: bool = True, **overrides
) -> SFTConfig:
    """Build an :class:`SFTConfig` for a model already loaded; every default can be overridden by keyword.

    On top of the class defaults: mixed precision follows the model's dtype (bf16 or fp16 on a GPU, none on the
    CPU or for a float32 model), no intermediate checkpoints, and no tqdm bar.

    Args:
        output_dir: where the trainer writes checkpoints and logs.
        model_dtype: the dtype the model was loaded in.
        gradient_checkpointing: recompute activations in backward.
        **overrides: any ``SFTConfig`` field.
    """
    on_gpu = torch.cuda.is_available()
    defaults = {
        "output_dir": output_dir,
        "save_strategy": "no",
        "disable_tqdm": True,
        "bf16": on_gpu and model_dtype == torch.bfloat16,
        "fp16": on_gpu and model_dtype == torch.float16,
        "gradient_checkpointing": gradient_checkpointing,
    }
    defaults.update(overrides)
    return SFTConfig(**defaults)
