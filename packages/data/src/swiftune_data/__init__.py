"""swiftune-data: dataset formats, chat templates, response-only masking and packing."""

from importlib.metadata import PackageNotFoundError, version

from swiftune_data.bundled import bundled_dataset_path
from swiftune_data.chat_templates import CHAT_TEMPLATES, ChatTemplate, get_chat_template, registered_template_of
from swiftune_data.files import load_dataset_file
from swiftune_data.formats import KNOWN_FORMATS, detect_format, standardize
from swiftune_data.images import bound_image_size, load_image
from swiftune_data.packing import DataCollatorForPackedSequences, block_causal_mask, pack_sequences
from swiftune_data.preference import standardize_preference
from swiftune_data.response_only import marker_token_variants, train_on_responses_only
from swiftune_data.text_chunks import chunk_text
from swiftune_data.tokenize import IGNORE_INDEX, tokenize_conversations
from swiftune_data.vision_collator import VisionDataCollator

try:
    __version__ = version("swiftune-data")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def load_conversations(path):
    """Load a local dataset file and standardize it to a ``messages`` column (see :func:`standardize`)."""
    return standardize(load_dataset_file(path))


__all__ = [
    "CHAT_TEMPLATES",
    "IGNORE_INDEX",
    "KNOWN_FORMATS",
    "ChatTemplate",
    "DataCollatorForPackedSequences",
    "VisionDataCollator",
    "bound_image_size",
    "load_image",
    "__version__",
    "block_causal_mask",
    "bundled_dataset_path",
    "chunk_text",
    "detect_format",
    "get_chat_template",
    "load_conversations",
    "load_dataset_file",
    "marker_token_variants",
    "pack_sequences",
    "registered_template_of",
    "standardize",
    "standardize_preference",
    "tokenize_conversations",
    "train_on_responses_only",
]
