"""Check every fast-path architecture on the GPU: patched vs plain transformers + peft, logits and LoRA gradients.

Small random models of each architecture (float32, so that the comparison is tight), LoRA on every projection,
one forward + backward each; prints the largest differences and exits non-zero when one passes its bound.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python bench/check_fast_path_gpu.py
"""

from __future__ import annotations

import sys

import torch
import transformers
from peft import LoraConfig, get_peft_model

from swiftune_loader.architectures import SPECS
from swiftune_loader.patching import fused_causal_lm_loss, patch_model

SMALL = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
    pad_token_id=0,
)
EXTRA = {
    "gemma2": dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=64),
    "gemma3_text": dict(sliding_window=64),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=64),
}
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(model_type: str):
    config = transformers.AutoConfig.for_model(model_type, **SMALL, **EXTRA.get(model_type, {}))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).cuda()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS.get(model_type, DEFAULT_TARGETS), init_lora_weights=False
    )
    torch.manual_seed(1)
    return get_peft_model(model, lora)


def float64_loss(model, ids, position_ids) -> float:
    """The next-token loss from the decoder's hidden states with the lm_head and cross-entropy in float64."""
    base = model.get_base_model()
    with torch.no_grad():
        hidden = base.model(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state.double()
        logits = hidden @ base.lm_head.weight.double().T
        config = base.config
        if getattr(config, "logits_scaling", None):
            logits = logits / config.logits_scaling
        if getattr(config, "final_logit_softcapping", None):
            logits = config.final_logit_softcapping * torch.tanh(logits / config.final_logit_softcapping)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        ).item()


def main() -> int:
    ids = torch.randint(1, SMALL["vocab_size"], (2, 200), device="cuda")
    position_ids = torch.cat([torch.arange(120), torch.arange(80)]).expand(2, -1).cuda()  # packed rows
    failures = 0
    print(f"{'model_type':<14}{'max |dlogits|':>15}{'max |dgrad| (rel)':>20}{'|dloss| fused':>15}")
    for model_type in SPECS:
        results = []
        for fast in (False, True):
            model = build(model_type)
            if fast:
                patch_model(model.get_base_model())
            # use_cache=False, as in training (TRL sets it): restarting position_ids then keep packed samples apart.
            out = model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False)
            out.loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            fused = fused_causal_lm_loss(model, {"input_ids": ids, "labels": ids, "position_ids": position_ids})
            results.append((out.logits.detach(), grads, out.loss.detach(), fused.detach()))
            if fast:
                exact = float64_loss(model, ids, position_ids)
                print(
                    f"  {model_type}: |transformers - float64| {abs(out.loss.item() - exact):.2e}, "
                    f"|fused - float64| {abs(fused.item() - exact):.2e}"
                )
        (ref_logits, ref_grads, ref_loss, _), (logits, grads, _, fused) = results
        d_logits = (logits - ref_logits).abs().max().item()
        d_grad = max(((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in ref_grads.items())
        d_loss = (fused - ref_loss).abs().item()
        ok = d_logits < 1e-3 and d_grad < 1e-3 and d_loss < 1e-4
        failures += not ok
        print(f"{model_type:<14}{d_logits:>15.2e}{d_grad:>20.2e}{d_loss:>15.2e}  {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
