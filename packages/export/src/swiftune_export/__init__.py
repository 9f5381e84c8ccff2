"""swiftune-export: merged safetensors, peft adapters, GGUF and Ollama."""

from importlib.metadata import PackageNotFoundError, version

from swiftune_export.atomic import atomic_directory
from swiftune_export.gguf_export import write_gguf
from swiftune_export.merge import lora_scale, merge_adapter
from swiftune_export.ollama import write_modelfile
from swiftune_export.save import save_merged

try:
    __version__ = version("swiftune-export")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "__version__",
    "atomic_directory",
    "lora_scale",
    "merge_adapter",
    "save_merged",
    "write_gguf",
    "write_modelfile",
]
