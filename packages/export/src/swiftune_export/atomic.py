"""Atomic writes: an output folder or file appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it is renamed to ``target``, on error removed.

    Args:
        target: the folder to create.
        overwrite: replace an existing ``target`` folder (only once the new one is complete).

    Raises:
        FileExistsError: ``target`` is a file, or a non-empty folder and ``overwrite`` is False.
    """
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output path '{target}' is an existing file; pass a folder path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder '{target}' is not empty; choose another path or pass overwrite=True.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed to ``target``, on error removed.

    The rename happens on the same file system, so a reader sees either no file or the complete one.

    Args:
        target: the file to create.
        overwrite: replace an existing ``target`` file (only once the new one is complete).

    Raises:
        FileExistsError: ``target`` is a folder, or an existing file and ``overwrite`` is False.
    """
    target = Path(target).expanduser()
    if target.is_dir():
        raise FileExistsError(f"Output path '{target}' is an existing folder; pass a file path.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"Output file '{target}' exists; choose another path or pass overwrite=True.")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o644)
        os.replace(staging, target)
    finally:
        if staging.exists():
            staging.unlink()
