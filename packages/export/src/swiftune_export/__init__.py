"""swiftune-export: merged safetensors (16-bit or 4-bit), peft adapters, GGUF and Ollama Modelfiles."""

from importlib.metadata import PackageNotFoundError, version

from swiftune_export.atomic import OutOfSpaceError, atomic_directory, atomic_file
from swiftune_export.gguf_export import write_gguf
from swiftune_export.gguf_quant_types import QUANT_TYPES
from swiftune_export.merge import lora_scale
from swiftune_export.merged_folder import merge_adapter
from swiftune_export.ollama import write_modelfile
from swiftune_export.save import METHODS, save_gguf, save_merged

try:
    __version__ = version("swiftune-export")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "METHODS",
    "QUANT_TYPES",
    "OutOfSpaceError",
    "__version__",
    "atomic_directory",
    "atomic_file",
    "lora_scale",
    "merge_adapter",
    "save_gguf",
    "save_merged",
    "write_gguf",
    "write_modelfile",
]
