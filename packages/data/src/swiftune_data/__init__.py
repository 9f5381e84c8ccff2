"""swiftune-data: dataset formats, chat templates, response-only masking and packing."""

from importlib.metadata import PackageNotFoundError, version

from swiftune_data.bundled import bundled_dataset_path
from swiftune_data.files import load_dataset_file
from swiftune_data.formats import KNOWN_FORMATS, detect_format, standardize
from swiftune_data.tokenize import IGNORE_INDEX, tokenize_conversations

try:
    __version__ = version("swiftune-data")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def load_conversations(path):
    """Load a local dataset file and standardize it to a ``messages`` column (see :func:`standardize`)."""
    return standardize(load_dataset_file(path))


__all__ = [
    "IGNORE_INDEX",
    "KNOWN_FORMATS",
    "__version__",
    "bundled_dataset_path",
    "detect_format",
    "load_conversations",
    "load_dataset_file",
    "standardize",
    "tokenize_conversations",
]
