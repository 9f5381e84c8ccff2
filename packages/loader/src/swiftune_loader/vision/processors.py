"""Loading a vision-language model's processor, with an image-only fallback where torchvision is missing.

Qwen2-VL and Qwen2.5-VL processors hold a video processor, and transformers builds video processors with
torchvision only. Fine-tuning on images needs neither, so where torchvision is not installed (or the folder holds no
video processor config) the processor is built without its video part: the same image processor, tokenizer and
chat template, and a clear error if videos are passed. Otherwise the processor is transformers' own, unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

_MISSING = (
    "'{path}' holds no image processor (processor_config.json or preprocessor_config.json); copy the processor "
    "and tokenizer files of the original model into it."
)


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False):
    """The processor saved in ``path``: transformers' ``AutoProcessor``, or its image-only variant (see module doc).

    Args:
        path: a local model folder.
        trust_remote_code: run processor code shipped in the folder.

    Raises:
        FileNotFoundError: the folder holds no image processor.
        ImportError: the processor needs a library that is missing for a reason other than video support.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError) as error:
        # ImportError: no torchvision; OSError: a folder saved by the image-only processor has no video config.
        if "torchvision" not in str(error).lower() and "video" not in str(error).lower():
            if isinstance(error, OSError):
                raise FileNotFoundError(_MISSING.format(path=path)) from error
            raise
        processor_class = _saved_processor_class(path, trust_remote_code)
        if processor_class is None or "video_processor" not in processor_class.get_attributes():
            raise
        logger.warning(
            "%s is loaded without its video processor (%s): images work, videos do not.",
            processor_class.__name__,
            "torchvision is not installed" if "torchvision" in str(error).lower() else "the folder has no video config",
        )
        return image_only_processor_class(processor_class).from_pretrained(path, trust_remote_code=trust_remote_code)
    if not hasattr(processor, "image_processor"):  # transformers falls back to the tokenizer alone
        raise FileNotFoundError(_MISSING.format(path=path))
    return processor


@cache
def image_only_processor_class(processor_class: type) -> type:
    """A subclass of ``processor_class`` that holds no video processor.

    transformers reads a processor's parts from the parameters of its ``__init__``; the subclass's ``__init__`` does
    not name ``video_processor``, so the processor is built, saved and loaded with its image processor and tokenizer
    only. It keeps the parent's name, so the folders it saves name transformers' processor class.

    Args:
        processor_class: a transformers processor class whose ``__init__`` takes ``video_processor``.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    def __call__(self, *args, videos=None, **kwargs):
        # transformers skips the videos of a processor without a video processor, leaving their tokens unfilled.
        if videos is not None or (len(args) > 2 and args[2] is not None):
            raise ValueError(
                f"This {processor_class.__name__} was loaded without torchvision and cannot process videos; "
                "pip install torchvision, or pass images only."
            )
        return processor_class.__call__(self, *args, **kwargs)

    return type(
        processor_class.__name__,
        (processor_class,),
        {"__init__": __init__, "__call__": __call__, "__module__": processor_class.__module__},
    )


def _saved_processor_class(path, trust_remote_code: bool):
    """The processor class the folder names (processor_config.json), or the one transformers maps its model to."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    saved = Path(path) / "processor_config.json"
    name = json.loads(saved.read_text()).get("processor_class") if saved.is_file() else None
    if name is None:
        model_type = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None
