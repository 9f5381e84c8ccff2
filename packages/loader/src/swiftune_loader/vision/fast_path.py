"""The loader's text fast path put into the language model of a vision-language model.

Only the language model is patched (with its own text config, which names its activation): the vision tower and
the projector keep transformers' code. The patch is the loader's own (:func:`swiftune_loader.patching.patch_model`),
so it is reversible through the returned handle.
"""

from __future__ import annotations

import logging

import torch

from swiftune_loader.patching import PatchHandle, patch_model
from swiftune_loader.vision.architectures import layout_of, text_spec_for

logger = logging.getLogger(__name__)


def patch_language_model(model: torch.nn.Module) -> PatchHandle | None:
    """Patch the language model inside ``model`` with swiftune's kernels; None (with a warning) when its text
    architecture has no fast path or the language model cannot be found.

    Args:
        model: a transformers vision-language model (not a peft wrapper).
    """
    layout = layout_of(model)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    text_type = getattr(text_config, "model_type", None)
    spec = text_spec_for(text_type)
    if layout is None or spec is None:
        logger.warning(
            "No swiftune fast path for the language model of %s (text model_type=%r): it trains through plain "
            "transformers.",
            model.config.model_type,
            text_type,
        )
        return None
    return patch_model(model.get_submodule(layout.language_model), spec)
