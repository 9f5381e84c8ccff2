"""Qwen3: Llama's layer with an RMSNorm over each head of q and k before RoPE, and no q/k/v biases."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="qwen3",
    norm_class_names=("Qwen3RMSNorm",),
    norm_offset=0.0,
    norm_casting="llama",
    attention_class_names=("Qwen3Attention",),
    mlp_class_names=("Qwen3MLP",),
    activation="silu",
    qk_norm=True,
    mlp_output_to_residual=True,
)
