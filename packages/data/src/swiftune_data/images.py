"""Images for vision-language training: opening them from what a dataset holds, and bounding their size.

A dataset may hold PIL images, file paths, or the ``{"bytes": ..., "path": ...}`` dicts that ``datasets`` stores
for undecoded images. Every failure names the example and the file, so a bad row is found without a debugger.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path


def load_image(source, example_index: int, image_root: str | os.PathLike | None = None):
    """Open ``source`` as an RGB PIL image.

    Args:
        source: a PIL image, a path (str or PathLike, relative ones taken from ``image_root``), or a dict with
            ``bytes`` and/or ``path``.
        example_index: the example's index in the batch or dataset, for the error message.
        image_root: the folder relative paths are read from; the working directory when None.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file or bytes are not a readable image, or ``source`` is of another type.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    if isinstance(source, dict) and source.get("bytes") is not None:
        return _open(io.BytesIO(source["bytes"]), source.get("path") or "<image bytes>", example_index)
    if isinstance(source, dict) and source.get("path"):
        source = source["path"]
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root).expanduser() / path
        if not path.is_file():
            raise FileNotFoundError(
                f"Example {example_index}: image file '{path}' does not exist; fix the path (relative paths are read "
                f"from {'image_root=' + repr(str(image_root)) if image_root is not None else 'the working directory'})"
                " or drop the example."
            )
        return _open(path, path, example_index)
    raise ValueError(
        f"Example {example_index}: an image must be a PIL image, a file path or a {{'bytes', 'path'}} dict, got "
        f"{type(source).__name__}."
    )


def bound_image_size(image, max_pixels: int | None = None, longest_edge: int | None = None):
    """``image`` scaled down (aspect ratio kept) so that it has at most ``max_pixels`` pixels and no side longer
    than ``longest_edge``; the image itself when it already fits. Images are never scaled up.

    Image tokens grow with the pixel count for Qwen2-VL-style processors, so one large photo can take more of the
    sequence (and memory) than the whole conversation; bounding the size keeps every example in budget.
    """
    from PIL import Image

    width, height = image.size
    scale = 1.0
    if max_pixels is not None and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    if longest_edge is not None and max(width, height) * scale > longest_edge:
        scale = longest_edge / max(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _open(file, shown, example_index: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            return image.convert("RGB")  # convert() reads the pixels now, so the file can close
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(
            f"Example {example_index}: '{shown}' is not a readable image ({type(error).__name__}: {error}); replace "
            "the file or drop the example."
        ) from error
