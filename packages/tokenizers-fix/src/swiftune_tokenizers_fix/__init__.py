"""swiftune-tokenizers-fix: load and repair tokenizers and embeddings for fine-tuning."""

from importlib.metadata import PackageNotFoundError, version

from swiftune_tokenizers_fix.bos import fix_double_bos
from swiftune_tokenizers_fix.chat_template import fix_generation_prompt
from swiftune_tokenizers_fix.embeddings import add_new_tokens, fix_embedding_size, trainable_token_ids
from swiftune_tokenizers_fix.fix import fix_tokenizer
from swiftune_tokenizers_fix.labels import check_labels
from swiftune_tokenizers_fix.load import PROBE_TEXT, load_tokenizer, rebuild_from_sentencepiece
from swiftune_tokenizers_fix.pad_token import fix_pad_token
from swiftune_tokenizers_fix.padding_side import for_generation, for_training, set_padding_side
from swiftune_tokenizers_fix.report import Repair
from swiftune_tokenizers_fix.sentencepiece_fast import sentencepiece_to_tokenizers
from swiftune_tokenizers_fix.special_tokens import fix_special_tokens
from swiftune_tokenizers_fix.untrained import fix_untrained_tokens

try:
    __version__ = version("swiftune-tokenizers-fix")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "PROBE_TEXT",
    "Repair",
    "__version__",
    "add_new_tokens",
    "check_labels",
    "fix_double_bos",
    "fix_embedding_size",
    "fix_generation_prompt",
    "fix_pad_token",
    "fix_special_tokens",
    "fix_tokenizer",
    "fix_untrained_tokens",
    "for_generation",
    "for_training",
    "load_tokenizer",
    "rebuild_from_sentencepiece",
    "sentencepiece_to_tokenizers",
    "set_padding_side",
    "trainable_token_ids",
]
