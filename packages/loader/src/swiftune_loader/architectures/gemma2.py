"""Gemma 2: Gemma's norms and GeGLU, attention logit soft-capping and sliding-window layers (both passed to the
attention function as transformers does), and final logit soft-capping (applied by the fused loss)."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="gemma2",
    norm_class_names=("Gemma2RMSNorm",),
    norm_offset=1.0,
    norm_casting="gemma",
    attention_class_names=("Gemma2Attention",),
    mlp_class_names=("Gemma2MLP",),
    activation="gelu_tanh",
)
