"""Phi-3 / Phi-4: Llama's layer with fused qkv and gate_up projections (split after projecting) and partial
rotary dimensions (cos/sin narrower than the head; the rest passes through)."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="phi3",
    norm_class_names=("Phi3RMSNorm",),
    norm_offset=0.0,
    norm_casting="llama",
    attention_class_names=("Phi3Attention",),
    mlp_class_names=("Phi3MLP",),
    activation="silu",
    fused_qkv=True,
    fused_gate_up=True,
    mlp_output_to_residual=True,
)
