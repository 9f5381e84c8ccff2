"""Tensor names in a checkpoint versus in the loaded model, translated by transformers' own conversion mapping.

transformers 5 renames checkpoint keys as it loads them (a vision-language checkpoint's ``language_model.model.*``
becomes the module ``model.language_model.*``) and renames them back as it saves. A peft adapter is saved with the
loaded model's module names, so merging it into a base read from disk needs the translation transformers applies.
It is taken from transformers (``get_model_conversion_mapping``, ``rename_source_key``) rather than written here,
so that it follows transformers' changes. transformers is imported only when these functions are called; without
it, or for models without a mapping, names are left as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def loaded_name_function(config: dict) -> Callable[[str], str] | None:
    """A function from a checkpoint tensor name to the name transformers gives it once loaded, for a model of
    ``config`` (config.json as a dict); None when transformers renames nothing for it (or is not installed).

    The model is built on the meta device (no memory for weights) to collect its conversion mapping as
    ``from_pretrained`` does.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an export without transformers: checkpoint names are the only names
        return None
    model = _meta_model(config)
    if model is None:
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return None
    loaded = model.state_dict()
    prefix = model.base_model_prefix

    def loaded_name(name: str) -> str:
        # The same two tries as transformers' loader: renamed, else the key as it is (with the prefix fixed).
        renamed, _ = rename_source_key(name, renamings, converters, prefix, loaded)
        if renamed not in loaded and name in loaded:
            renamed, _ = rename_source_key(name, [], [], prefix, loaded)
        return renamed

    return loaded_name


def checkpoint_name_function(model) -> Callable[[str], str] | None:
    """A function from a loaded model's tensor name to the name ``save_pretrained`` writes it under; None when
    transformers renames nothing for this model (or is not installed).

    Args:
        model: a transformers model (not a peft wrapper).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    transforms = getattr(model, "_weight_conversions", None)
    if transforms is None and hasattr(model, "is_custom_code"):
        # As save_pretrained does for a model that was not loaded by from_pretrained.
        transforms = [
            t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)
        ]
    if not transforms:
        return None
    reverse = [t.reverse_transform() for t in transforms[::-1]]
    renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
    converters = [t for t in reverse if isinstance(t, WeightConverter)]

    def checkpoint_name(name: str) -> str:
        renamed, converter = rename_source_key(name, renamings, converters, reverse=True)
        # A tensor that a converter splits or fuses (stacked experts) has no one checkpoint name: keep the loaded one.
        return name if converter is not None else renamed

    return checkpoint_name


def _meta_model(config: dict):
    """The model of ``config`` built on the meta device, or None when transformers has no class for it."""
    import transformers

    names = config.get("architectures") or []
    model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if model_class is None or "model_type" not in config:
        return None
    try:
        settings = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
        model_config = transformers.AutoConfig.for_model(config["model_type"], **settings)
        with torch.device("meta"):
            return model_class._from_config(model_config)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        logger.warning(
            "Could not build %s to read its checkpoint names (%s); names are used as they are.", names, error
        )
        return None
