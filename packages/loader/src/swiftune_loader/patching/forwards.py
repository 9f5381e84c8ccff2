"""Forward functions bound to single module instances by the patching engine.

They reuse the module's own projections (plain, LoRA-wrapped or quantized) and replace only the math that
swiftune's kernels do faster: RoPE in attention, the gated activation in the MLP.
"""

from __future__ import annotations

import torch

from swiftune_kernels import apply_rotary_pos_emb, gated_activation


def attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    """Llama-family attention with RoPE applied to q and k in one swiftune kernel launch."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    attention = _attention_interface(self.config._attn_implementation)
    output, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=_sliding_window(self),
        **kwargs,
    )
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


def gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with the activation and product in one swiftune kernel."""
    return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), self._swiftune_activation))


def _sliding_window(attention) -> int | None:
    # Qwen2 decides per layer (an attribute of the module); Mistral for the whole model (its config); Llama has none.
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)


def _attention_interface(implementation: str):
    """transformers' attention function for ``implementation`` (sdpa, flash_attention_2, eager, ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)  # newer transformers 5 releases
    if get_interface is not None:
        return get_interface(implementation, eager_attention_forward)
    return eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
