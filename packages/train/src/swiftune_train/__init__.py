"""swiftune-train: training arguments and trainers on TRL for swiftune models."""

from importlib.metadata import PackageNotFoundError, version

from swiftune_loader.patching import fused_causal_lm_loss
from swiftune_train.arguments import sft_config
from swiftune_train.progress import ProgressPrinter
from swiftune_train.sft_job import SFTJob, SFTResult, check_output_dir, run_sft_job, save_adapter
from swiftune_train.trainer import SFTTrainer

try:
    __version__ = version("swiftune-train")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
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
