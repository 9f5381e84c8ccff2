"""Reversible patching of built models with swiftune's kernels."""

from swiftune_loader.patching.causal_lm_loss import causal_lm_parts, fused_causal_lm_loss
from swiftune_loader.patching.engine import PatchHandle, patch_model

__all__ = ["PatchHandle", "causal_lm_parts", "fused_causal_lm_loss", "patch_model"]
