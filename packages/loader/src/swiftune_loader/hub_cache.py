"""Finding a repository in the local Hugging Face cache, read-only and without any network.

The cache layout is huggingface_hub's: ``<cache>/models--<org>--<name>/snapshots/<revision>/`` holds the files
(often links into ``blobs/``), and ``refs/main`` names the revision the ``main`` branch pointed to when it was
downloaded. The cache folder is read from the environment at call time, as huggingface_hub resolves it.
"""

from __future__ import annotations

import os
from pathlib import Path


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "huggingface" / "hub"


def cached_snapshot(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The snapshot folder of model repository ``repo_id`` in the cache, or None when it is not there.

    The snapshot ``refs/main`` points at is preferred; else the most recently written snapshot that holds a
    ``config.json``. The repository folder is matched case-insensitively, as the hub matches repository ids.

    Args:
        repo_id: ``"org/name"``.
        cache_dir: the hub cache; defaults to :func:`hub_cache_dir`.
    """
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo_folder = _repo_folder(cache, repo_id)
    if repo_folder is None:
        return None
    snapshots = repo_folder / "snapshots"
    ref = repo_folder / "refs" / "main"
    if ref.is_file():
        pinned = snapshots / ref.read_text().strip()
        if (pinned / "config.json").is_file():
            return pinned
    candidates = [s for s in snapshots.iterdir() if (s / "config.json").is_file()] if snapshots.is_dir() else []
    return max(candidates, key=lambda s: s.stat().st_mtime) if candidates else None


def _repo_folder(cache: Path, repo_id: str) -> Path | None:
    name = "models--" + repo_id.strip().replace("/", "--")
    exact = cache / name
    if exact.is_dir():
        return exact
    if not cache.is_dir():
        return None
    lowered = name.lower()
    return next((p for p in cache.iterdir() if p.name.lower() == lowered and p.is_dir()), None)
