"""Mistral: Llama's layer with sliding-window attention (handled by the attention interface, not here)."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="mistral",
    norm_class_names=("MistralRMSNorm",),
    norm_offset=0.0,
    norm_casting="llama",
    attention_class_names=("MistralAttention",),
    mlp_class_names=("MistralMLP",),
    activation="silu",
    mlp_output_to_residual=True,
)
