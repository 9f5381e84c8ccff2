"""``swiftune.FastLanguageModel``: the loader's FastLanguageModel with the habits of the whole toolkit.

The loader alone depends on the kernels only, so it neither repairs tokenizers nor exports. Through the
meta-package, which depends on every swiftune package, a loaded model gets both: the tokenizer goes through
swiftune-tokenizers-fix when ``fix_tokenizer=True`` (the default), and the model carries
``save_pretrained_merged`` and ``save_pretrained_gguf`` backed by swiftune-export.
"""

from __future__ import annotations

import logging
import os
import types

from swiftune_loader import FastLanguageModel as _LoaderFastLanguageModel

logger = logging.getLogger(__name__)


def repair_tokenizer(model, tokenizer):
    """Run swiftune-tokenizers-fix on ``tokenizer`` (and ``model``'s configs and embeddings); return the tokenizer."""
    from swiftune_tokenizers_fix import fix_tokenizer

    tokenizer, repairs = fix_tokenizer(tokenizer, model)
    for repair in repairs:
        logger.info("Tokenizer repaired: %s", repair)
    return tokenizer


def save_pretrained_merged(self, out: str | os.PathLike, tokenizer=None, save_method: str = "merged_16bit", **kwargs):
    """Save this model's adapter merged into its base (``"merged_16bit"``, ``"merged_4bit"``) or as a peft adapter
    (``"lora"``), with the tokenizer beside it. Keyword arguments go to ``swiftune_export.save_merged``.

    Returns:
        The output folder as a Path.
    """
    from swiftune_export import save_merged

    return save_merged(self, tokenizer, out, method=save_method, **kwargs)


def save_pretrained_gguf(
    self, out: str | os.PathLike, tokenizer=None, quantization_method: str | list[str] = "q4_k_m", **kwargs
):
    """Save this model (adapter merged) as GGUF, one file per quantization in ``quantization_method``, with an
    Ollama Modelfile. Keyword arguments go to ``swiftune_export.save_gguf``.

    Returns:
        What ``swiftune_export.save_gguf`` returns (the written file paths).
    """
    from swiftune_export import save_gguf

    return save_gguf(self, tokenizer, out, quantization=quantization_method, **kwargs)


def attach_export_methods(model):
    """Give ``model`` (a transformers or peft model) ``save_pretrained_merged`` and ``save_pretrained_gguf``."""
    model.save_pretrained_merged = types.MethodType(save_pretrained_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, model)
    return model


class FastLanguageModel(_LoaderFastLanguageModel):
    """swiftune_loader's ``FastLanguageModel`` that also repairs the tokenizer and adds the export methods.

    Every argument is the loader's (see ``swiftune_loader.FastLanguageModel``), except that ``fix_tokenizer``
    defaults to True here and means "run swiftune-tokenizers-fix".
    """

    @staticmethod
    def from_pretrained(model_name=None, *args, fix_tokenizer=True, **kwargs):
        """Load like ``swiftune_loader.FastLanguageModel.from_pretrained``; repair the tokenizer unless
        ``fix_tokenizer=False`` (or a callable ``(model, tokenizer) -> tokenizer`` of your own); the model
        carries ``save_pretrained_merged`` and ``save_pretrained_gguf``.

        Returns:
            (model, tokenizer)
        """
        fixer = repair_tokenizer if fix_tokenizer is True else fix_tokenizer
        model, tokenizer = _LoaderFastLanguageModel.from_pretrained(model_name, *args, fix_tokenizer=fixer, **kwargs)
        return attach_export_methods(model), tokenizer

    @staticmethod
    def get_peft_model(model, *args, **kwargs):
        """Add LoRA like ``swiftune_loader.FastLanguageModel.get_peft_model``; the peft model carries the export
        methods too."""
        return attach_export_methods(_LoaderFastLanguageModel.get_peft_model(model, *args, **kwargs))
