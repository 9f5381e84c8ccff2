"""swiftune-train: training arguments and trainers on TRL for swiftune models."""

from importlib.metadata import PackageNotFoundError, version

from swiftune_loader.patching import fused_causal_lm_loss
from swiftune_train.arguments import (
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    SFTConfig,
    SwiftuneArguments,
    default_optimizer,
    sft_config,
)
from swiftune_train.callbacks import (
    InterruptCallback,
    LossCurveCallback,
    NanGuardCallback,
    ThroughputCallback,
    plot_loss_curve,
)
from swiftune_train.distributed import fsdp2_wrap, is_main_process, save_sharded_adapter
from swiftune_train.dpo import DPOTrainer
from swiftune_train.grpo import GRPOTrainer
from swiftune_train.kto import KTOTrainer
from swiftune_train.logprobs import chunked_token_logprobs, install_chunked_lm_head
from swiftune_train.progress import ProgressPrinter
from swiftune_train.sft_job import SFTJob, SFTResult, check_output_dir, run_sft_job, save_adapter
from swiftune_train.trainer import SFTTrainer
from swiftune_train.trainer_mixin import SwiftuneTrainerMixin

try:
    __version__ = version("swiftune-train")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def __getattr__(name: str):
    # ORPOConfig is built on first use (TRL keeps ORPO under trl.experimental, whose import warns).
    if name == "ORPOConfig":
        from swiftune_train import arguments

        return arguments.ORPOConfig
    if name == "ORPOTrainer":
        from swiftune_train.orpo import ORPOTrainer

        return ORPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "GRPOTrainer",
    "KTOTrainer",
    "ORPOTrainer",
    "chunked_token_logprobs",
    "install_chunked_lm_head",
    "GRPOConfig",
    "InterruptCallback",
    "fsdp2_wrap",
    "is_main_process",
    "save_sharded_adapter",
    "KTOConfig",
    "LossCurveCallback",
    "NanGuardCallback",
    "ORPOConfig",
    "SFTConfig",
    "SwiftuneArguments",
    "SwiftuneTrainerMixin",
    "ThroughputCallback",
    "default_optimizer",
    "plot_loss_curve",
    "ProgressPrinter",
    "SFTTrainer",
    "SFTJob",
    "SFTResult",
    "__version__",
    "check_output_dir",
    "fused_causal_lm_loss",
    "run_sft_job",
    "save_adapter",
    "sft_config",
]
