"""Qwen2 / Qwen2.5: Llama's layer with biases on q, k and v (kept: the projections are called as they are)."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="qwen2",
    norm_class_names=("Qwen2RMSNorm",),
    norm_offset=0.0,
    norm_casting="llama",
    attention_class_names=("Qwen2Attention",),
    mlp_class_names=("Qwen2MLP",),
    activation="silu",
    mlp_output_to_residual=True,
)
