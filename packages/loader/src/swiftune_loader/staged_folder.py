"""Writing a folder so that it appears complete or not at all: written beside the target, renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out_dir``; when the block finishes, it replaces ``out_dir``.

    If the block raises, the staging folder is removed and ``out_dir`` is left as it was, so that a reader (or a
    resumed run) never finds a half-written model or adapter under the target's name.

    Args:
        out_dir: the folder to write; its parents are created.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
