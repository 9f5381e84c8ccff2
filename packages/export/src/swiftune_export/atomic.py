"""Atomic writes: an output folder or file appears complete or not at all.

The output is written under a temporary name beside the target and renamed into place once complete, so a
reader never sees a partial file. When the disk fills up (or a file size limit is hit) midway, the partial output
is removed and the error says how much free space the output needs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# ENOSPC: the disk is full; EDQUOT: the user's quota is; EFBIG: the file is larger than the system allows.
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class OutOfSpaceError(OSError):
    """The disk (or a quota or file size limit) could not take the output; the message says how much it needs."""


def _is_out_of_space(error: OSError) -> bool:
    """A full disk, quota or file size limit; or a buffered write the OS cut short, which is how Python's buffered
    files report a disk that filled up midway ("N requested and M written", without an errno)."""
    if isinstance(error, OutOfSpaceError):
        return False
    return error.errno in _OUT_OF_SPACE or (error.errno is None and " requested and " in str(error))


def _out_of_space(error: OSError, target: Path, needed_bytes: int | None) -> OutOfSpaceError:
    reason = error.strerror or f"the disk took only part of a write: {error}"
    return OutOfSpaceError(error.errno or errno.ENOSPC, out_of_space_message(target, needed_bytes, reason))


def human_bytes(size: float) -> str:
    """``size`` bytes written for a person: '1.4 GB', '312.0 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system holding ``folder`` (or its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def out_of_space_message(target: Path, needed_bytes: int | None, reason: str) -> str:
    """One sentence saying what failed, how much space the output needs and how much there is."""
    need = f"about {human_bytes(needed_bytes)}" if needed_bytes else "more space than is left"
    return (
        f"Could not write '{target}' ({reason}): the output needs {need} free on that disk and "
        f"{human_bytes(free_bytes(target.parent))} are free now; nothing was left behind. Free some space or choose "
        "another output path."
    )


def check_free_space(target: Path, needed_bytes: int | None) -> None:
    """Refuse to start a write that cannot fit on the disk.

    Raises:
        OutOfSpaceError: (ENOSPC) fewer free bytes than ``needed_bytes``.
    """
    if needed_bytes and free_bytes(target.parent) < needed_bytes:
        raise OutOfSpaceError(errno.ENOSPC, out_of_space_message(target, needed_bytes, "not enough free space"))


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike, overwrite: bool = False, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it is renamed to ``target``, on error removed.

    Args:
        target: the folder to create.
        overwrite: replace an existing ``target`` folder (only once the new one is complete).
        needed_bytes: the expected size of the output; the write is refused up front when the disk has less free.

    Raises:
        FileExistsError: ``target`` is a file, or a non-empty folder and ``overwrite`` is False.
        OutOfSpaceError: the disk is (or became) too full; the message names the space needed.
    """
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output path '{target}' is an existing file; pass a folder path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder '{target}' is not empty; choose another path or pass overwrite=True.")
    check_free_space(target, needed_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except OSError as error:
        if not _is_out_of_space(error):
            raise
        shutil.rmtree(staging, ignore_errors=True)  # first, so that the message counts the space it held as free
        raise _out_of_space(error, target, needed_bytes) from error
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, overwrite: bool = False, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed to ``target``, on error removed.

    The rename happens on the same file system, so a reader sees either no file or the complete one.

    Args:
        target: the file to create.
        overwrite: replace an existing ``target`` file (only once the new one is complete).
        needed_bytes: the expected size of the file; the write is refused up front when the disk has less free.

    Raises:
        FileExistsError: ``target`` is a folder, or an existing file and ``overwrite`` is False.
        OutOfSpaceError: the disk is (or became) too full; the message names the space needed.
    """
    target = Path(target).expanduser()
    if target.is_dir():
        raise FileExistsError(f"Output path '{target}' is an existing folder; pass a file path.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"Output file '{target}' exists; choose another path or pass overwrite=True.")
    check_free_space(target, needed_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o644)
        os.replace(staging, target)
    except OSError as error:
        if not _is_out_of_space(error):
            raise
        staging.unlink(missing_ok=True)  # first, so that the message counts the space it held as free
        raise _out_of_space(error, target, needed_bytes) from error
    finally:
        if staging.exists():
            staging.unlink()
