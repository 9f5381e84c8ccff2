"""swiftune: fast, memory-light fine-tuning of language models, and export of the result.

This meta-package gathers the swiftune packages under one name::

    from swiftune import FastLanguageModel, SFTJob, run_sft_job, merge_adapter
"""

from importlib.metadata import PackageNotFoundError, version

from swiftune.fast_language_model import FastLanguageModel
from swiftune_data import VisionDataCollator, load_conversations, standardize, tokenize_conversations
from swiftune_export import merge_adapter, save_gguf, save_merged
from swiftune_loader import FastVisionModel, chat_reply
from swiftune_train import SFTJob, run_sft_job, sft_config

try:
    __version__ = version("swiftune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "FastLanguageModel",
    "FastVisionModel",
    "VisionDataCollator",
    "SFTJob",
    "__version__",
    "chat_reply",
    "load_conversations",
    "merge_adapter",
    "run_sft_job",
    "save_gguf",
    "save_merged",
    "sft_config",
    "standardize",
    "tokenize_conversations",
]
