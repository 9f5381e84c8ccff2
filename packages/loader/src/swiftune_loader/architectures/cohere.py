"""Cohere (Command R): LayerNorm without bias, interleaved RoPE (pairs (2i, 2i + 1)), attention and MLP in parallel
on the same normed input (transformers' decoder layer does that, the patched modules do not care), logits multiplied
by ``logit_scale`` (applied by the fused loss), and optional per-head q/k LayerNorms (``use_qk_norm``)."""

from swiftune_loader.architectures.spec import ArchitectureSpec

SPEC = ArchitectureSpec(
    model_type="cohere",
    norm_class_names=("CohereLayerNorm",),
    norm_offset=0.0,
    norm_casting="llama",
    attention_class_names=("CohereAttention",),
    mlp_class_names=("CohereMLP",),
    activation="silu",
    rope="interleaved",
    qk_norm="use_qk_norm",
    norm_kind="layer_norm",
    mlp_output_to_residual=True,
)
