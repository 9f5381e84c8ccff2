"""Gemma (1): RMSNorm scaled by (1 + weight) in float32 before the cast, GeGLU with the tanh approximation."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="gemma",
    norm_class_names=("GemmaRMSNorm",),
    norm_offset=1.0,
    norm_casting="gemma",
    attention_class_names=("GemmaAttention",),
    mlp_class_names=("GemmaMLP",),
    activation="gelu_tanh",
    mlp_output_to_residual=True,
)
