"""swiftune-loader: FastLanguageModel loads, patches, adds LoRA, and switches between training and inference."""

from importlib.metadata import PackageNotFoundError, version

from swiftune_loader.default_model import DEFAULT_MODEL_NAME, convert_gguf_to_hf, default_model_path
from swiftune_loader.fast_language_model import FastLanguageModel
from swiftune_loader.generation import chat_reply
from swiftune_loader.model_names import resolve_model_name
from swiftune_loader.model_path import check_weight_safety, resolve_model_path
from swiftune_loader.vision import FastVisionModel

try:
    __version__ = version("swiftune-loader")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT_MODEL_NAME",
    "FastLanguageModel",
    "FastVisionModel",
    "__version__",
    "chat_reply",
    "check_weight_safety",
    "convert_gguf_to_hf",
    "default_model_path",
    "resolve_model_name",
    "resolve_model_path",
]
