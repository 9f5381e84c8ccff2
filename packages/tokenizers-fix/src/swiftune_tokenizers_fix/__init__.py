"""swiftune-tokenizers-fix: load and repair tokenizers and embeddings for fine-tuning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swiftune-tokenizers-fix")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
