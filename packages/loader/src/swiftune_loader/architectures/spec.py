"""What an architecture needs from the fast path, stated as data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureSpec:
    """The facts of one decoder architecture that the patching engine acts on.

    Attributes:
        model_type: transformers' ``config.model_type``.
        norm_class_names: class names of the norm modules to swap for swiftune's.
        norm_offset: 0.0 when the norm weight is used as given, 1.0 for ``1 + weight`` (Gemma). RMSNorm only.
        norm_casting: "llama" (normalise in float32, cast, then scale) or "gemma" (scale in float32, then cast).
            RMSNorm only.
        attention_class_names: class names of the attention modules whose RoPE runs through swiftune's kernel.
        mlp_class_names: class names of the gated MLP modules (gate_proj, up_proj, down_proj).
        activation: the gate activation when the config does not name one: "silu" (SwiGLU), "gelu" or
            "gelu_tanh" (GeGLU). The config's ``hidden_activation`` / ``hidden_act`` wins when present.
        rope: "rotate_half" (pairs (i, i + d/2): Llama) or "interleaved" (pairs (2i, 2i + 1): Cohere).
        qk_norm: a norm over each head of q and k before RoPE: True (Qwen3), or the name of the config flag that
            switches it on (Cohere's ``use_qk_norm``).
        norm_kind: "rms_norm", or "layer_norm" (mean-centred, no bias: Cohere).
        fused_qkv: q, k and v come from one ``qkv_proj`` (Phi-3), split after the projection.
        fused_gate_up: gate and up come from one ``gate_up_proj`` (Phi-3), split in halves.
        mlp_output_to_residual: the decoder layer only adds the MLP's output to the residual stream (scaled or
            dropped out at most) and returns the sum, so no backward in the layer reads the output's value; a
            checkpointed layer's recompute then skips the down projection. False where a norm follows the MLP
            (Gemma 2 and 3's post-feedforward norm reads it).
    """

    model_type: str
    norm_class_names: tuple[str, ...]
    norm_offset: float
    norm_casting: str
    attention_class_names: tuple[str, ...]
    mlp_class_names: tuple[str, ...]
    activation: str
    rope: str = "rotate_half"
    qk_norm: bool | str = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    norm_kind: str = "rms_norm"
    mlp_output_to_residual: bool = False

    def __post_init__(self) -> None:
        # Facts the engine branches on: a typo here would silently take the wrong branch.
        if self.rope not in ("rotate_half", "interleaved"):
            raise ValueError(f"{self.model_type}: rope must be 'rotate_half' or 'interleaved', got {self.rope!r}.")
        if self.norm_kind not in ("rms_norm", "layer_norm"):
            raise ValueError(
                f"{self.model_type}: norm_kind must be 'rms_norm' or 'layer_norm', got {self.norm_kind!r}."
            )
