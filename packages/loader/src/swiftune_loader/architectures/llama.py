"""Llama (1, 2, 3.x): RMSNorm with the weight as given, SwiGLU MLP, rotate-half RoPE."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="llama",
    norm_class_names=("LlamaRMSNorm",),
    norm_offset=0.0,
    norm_casting="llama",
    attention_class_names=("LlamaAttention",),
    mlp_class_names=("LlamaMLP",),
    activation="silu",
    mlp_output_to_residual=True,
)
