"""swiftune-cli: the ``swiftune`` command (train, export, chat, inspect)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swiftune-cli")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
