"""Reversible patching of built models with swiftune's kernels."""

from swiftune_loader.patching.engine import PatchHandle, patch_model

__all__ = ["PatchHandle", "patch_model"]
