"""Gemma 3 (text): Gemma 2's layer with an RMSNorm over each head of q and k before RoPE, and local/global RoPE
(the decoder layer hands each attention the right cos/sin)."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="gemma3_text",
    norm_class_names=("Gemma3RMSNorm",),
    norm_offset=1.0,
    norm_casting="gemma",
    attention_class_names=("Gemma3Attention",),
    mlp_class_names=("Gemma3MLP",),
    activation="gelu_tanh",
    qk_norm=True,
)
