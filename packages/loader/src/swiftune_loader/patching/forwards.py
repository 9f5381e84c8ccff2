"""Forward functions bound to single module instances by the patching engine.

They reuse the module's own projections (plain, LoRA-wrapped or quantized) and replace only the math that
swiftune's kernels do faster: RoPE in attention, the gated activation in the MLP.
"""

from __future__ import annotations

import torch

from swiftune_kernels import (
    apply_rotary_pos_emb,
    gated_activation,
    lora_linear,
    lora_mlp,
    lora_qkv,
    recomputing_for_backward,
    rope,
)
from swiftune_loader.patching.lora_parts import fusable_input, lora_parts


def attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    """Llama-family attention with RoPE applied to q and k in one swiftune kernel launch (rotate-half pairs, or
    interleaved pairs for Cohere; a cos/sin narrower than the head rotates only its leading channels, as Phi-3)."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    if self._swiftune_fused_qkv:
        qkv = _project(self.qkv_proj, hidden_states)
        q_size, kv_size = self.config.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        query, key, value = qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
    else:
        qkv = [lora_parts(self.q_proj), lora_parts(self.k_proj), lora_parts(self.v_proj)]
        if fusable_input(hidden_states, qkv):
            # One input for three LoRA projections: saved once, one fused backward.
            query, key, value = lora_qkv(hidden_states, *_flat(qkv))
        else:
            query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    query, key = query.view(hidden_shape), key.view(hidden_shape)
    if self._swiftune_qk_norm:
        query, key = self.q_norm(query), self.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = value.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    if self._swiftune_interleaved_rope:
        query, key = rope(query, key, cos, sin, interleaved=True)
    else:  # transformers' rotate-half tables: the drop-in reads only their first half
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    attention = _attention_interface(self)
    output, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=_dropout(self),
        scaling=self.scaling,
        sliding_window=_sliding_window(self),
        **_softcap(self),
        **kwargs,
    )
    return _project(self.o_proj, output.reshape(*input_shape, -1).contiguous()), weights


def gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) * up(x)): the fused LoRA MLP when all three projections allow it, else the projections
    as they are with the activation and product in one swiftune kernel.

    In the recompute of a checkpointed layer whose architecture only adds this output to the residual, the fused
    MLP skips the down projection: nothing reads the recomputed output's value, only its graph.
    """
    if self._swiftune_fused_gate_up:
        # Phi-3: one projection, split in halves (row-strided views the activation kernel reads in place).
        gate, up = _project(self.gate_up_proj, x).chunk(2, dim=-1)
        return _project(self.down_proj, gated_activation(gate, up, self._swiftune_activation))
    parts = [lora_parts(self.gate_proj), lora_parts(self.up_proj), lora_parts(self.down_proj)]
    if fusable_input(x, parts):
        output_needed = not (getattr(self, "_swiftune_output_to_residual", False) and recomputing_for_backward())
        return lora_mlp(x, *_flat(parts), activation=self._swiftune_activation, output_needed=output_needed)
    return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), self._swiftune_activation))


def _project(linear, x: torch.Tensor) -> torch.Tensor:
    """One projection: the fused LoRA function where it computes what peft does, else the module itself."""
    parts = lora_parts(linear)
    if fusable_input(x, [parts]):
        return lora_linear(x, *_flat([parts]))
    return linear(x)


def _flat(parts) -> list:
    """(W, A, B, s) of each projection, one after the other, as the fused LoRA functions take them."""
    return [item for p in parts for item in (p.weight, p.a, p.b, p.scale)]


def _dropout(attention) -> float:
    """The attention dropout probability while training (0 in eval): Llama-family modules call it
    ``attention_dropout``, Llama 3.2 Vision's self-attention ``dropout`` (a float there, not a module)."""
    if not attention.training:
        return 0.0
    if hasattr(attention, "attention_dropout"):
        return attention.attention_dropout
    probability = getattr(attention, "dropout", 0.0)
    return float(probability) if isinstance(probability, int | float) else 0.0


def _sliding_window(attention) -> int | None:
    # Qwen2 decides per layer (an attribute of the module); Mistral for the whole model (its config); Llama has none.
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)


def _attention_interface(attention):
    """transformers' attention function for the module's implementation (sdpa, flash_attention_2, eager, ...).

    For "eager" it is the family's own eager function (found in the module that defines the attention class):
    Gemma 2's, for one, applies the attention logit soft-capping that Llama's would silently drop.
    """
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = attention.config._attn_implementation
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)  # newer transformers 5 releases
    if get_interface is not None:
        return get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


def _softcap(attention) -> dict:
    # Gemma 2 and 3 soft-cap the attention logits; the other families take no such argument.
    softcap = getattr(attention, "attn_logit_softcapping", None)
    return {} if softcap is None else {"softcap": softcap}
