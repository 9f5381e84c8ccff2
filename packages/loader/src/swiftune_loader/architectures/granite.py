"""Granite: Llama's layer with scaled attention (the module's own scaling), scaled embeddings and residuals (left
to transformers' code), and logits divided by ``logits_scaling`` (applied by the fused loss)."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="granite",
    norm_class_names=("GraniteRMSNorm",),
    norm_offset=0.0,
    norm_casting="llama",
    attention_class_names=("GraniteAttention",),
    mlp_class_names=("GraniteMLP",),
    activation="silu",
    mlp_output_to_residual=True,
)
