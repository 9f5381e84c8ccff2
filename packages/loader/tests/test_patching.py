"""The fast path computes what plain transformers computes, forward and backward, and reverts cleanly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from swiftune_kernels.modules import LayerNorm, RMSNorm
from swiftune_loader.architectures import SPECS
from swiftune_loader.patching import patch_model
from swiftune_loader.testing import ARCHITECTURE_QUIRKS, tiny_config

SMALL = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    head_dim=12,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Every architecture with a fast path, built with its quirks on (swiftune_loader.testing.ARCHITECTURE_QUIRKS);
# Cohere here with its optional per-head q/k LayerNorms (the training-curve test covers it without).
EXTRA_FIELDS = {"cohere": {"use_qk_norm": True}}
CONFIGS = {t: (lambda t=t: tiny_config(t, **SMALL, **EXTRA_FIELDS.get(t, {}))) for t in ARCHITECTURE_QUIRKS}


def _model(model_type, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type](), dtype=dtype)
    # Norm weights away from 1, so that a norm that ignored its weight would be caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _loss_and_grads(model, ids, position_ids=None):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, position_ids=position_ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_patched_model_matches_plain_transformers(model_type):
    plain, fast = _model(model_type), _model(model_type)
    spec = SPECS[model_type]
    # Norms with one weight vector (Cohere's per-head q/k norms, weight (heads, head_dim), stay transformers').
    norms = sum(type(m).__name__ in spec.norm_class_names and m.weight.dim() == 1 for m in fast.modules())
    handle = patch_model(fast)
    # Every norm and every attention and MLP module went through the engine.
    assert handle.counts == {"norms": norms, "forwards": 2 * SMALL["num_hidden_layers"]}
    assert norms >= SMALL["num_hidden_layers"] + 1
    kernel_norm = LayerNorm if spec.norm_kind == "layer_norm" else RMSNorm
    assert isinstance(fast.model.norm, kernel_norm)
    ids = torch.randint(1, SMALL["vocab_size"], (2, 13))
    # Packed sequences: positions restart inside the row.
    position_ids = torch.tensor([list(range(6)) + list(range(7))] * 2)
    for positions in (None, position_ids):
        ref_logits, ref_grads = _loss_and_grads(plain, ids, positions)
        logits, grads = _loss_and_grads(fast, ids, positions)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_revert_restores_modules_and_forwards():
    model = _model("llama")
    norm_before = model.model.norm
    handle = patch_model(model)
    assert isinstance(model.model.norm, RMSNorm) and model.model.norm.weight is norm_before.weight
    assert "forward" in model.model.layers[0].mlp.__dict__
    handle.revert()
    assert model.model.norm is norm_before
    assert "forward" not in model.model.layers[0].mlp.__dict__
    assert "forward" not in model.model.layers[0].self_attn.__dict__


def test_state_dict_keys_are_unchanged_by_patching():
    model = _model("llama")
    keys = set(model.state_dict())
    patch_model(model)
    assert set(model.state_dict()) == keys


def test_unknown_architecture_is_refused():
    model = _model("llama")
    model.config.model_type = "unknown-arch"
    with pytest.raises(ValueError, match="no fast path for model_type='unknown-arch'"):
        patch_model(model)


def test_every_spec_names_its_own_model_type():
    assert all(key == spec.model_type for key, spec in SPECS.items())


LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "cohere": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# Fused LoRA calls expected per decoder layer.
FUSED_CALLS = {
    "llama": {"lora_qkv": 1, "lora_linear": 1, "lora_mlp": 1},
    "phi3": {"lora_linear": 4},
    "cohere": {"lora_qkv": 1, "lora_linear": 1, "lora_mlp": 1},
}


def _peft(model, dropout=0.0, model_type="llama"):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B is random too, so the adapters change the outputs and get every gradient.
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS[model_type], init_lora_weights=False
    )
    torch.manual_seed(3)
    return get_peft_model(model, config)


@pytest.mark.parametrize("model_type", sorted(LORA_TARGETS))
def test_fused_lora_path_matches_peft_and_is_taken(monkeypatch, model_type):
    import swiftune_loader.patching.forwards as forwards

    plain, fast = _peft(_model(model_type), model_type=model_type), _peft(_model(model_type), model_type=model_type)
    patch_model(fast.get_base_model())
    calls = []
    for name in ("lora_mlp", "lora_qkv", "lora_linear"):
        original = getattr(forwards, name)
        monkeypatch.setattr(forwards, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    ids = torch.randint(1, SMALL["vocab_size"], (2, 9))
    ref_logits, ref_grads = _loss_and_grads(plain, ids)
    logits, grads = _loss_and_grads(fast, ids)
    layers = SMALL["num_hidden_layers"]
    assert {name: calls.count(name) for name in set(calls)} == {
        name: count * layers for name, count in FUSED_CALLS[model_type].items()
    }
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and all("lora_" in name for name in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
    # With the adapters switched off, the fused path steps aside and the base model is computed.
    with fast.disable_adapter(), plain.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_with_dropout_keeps_peft_layers():
    from swiftune_loader.patching.lora_parts import lora_parts

    model = _peft(_model("llama"), dropout=0.1)
    assert lora_parts(model.get_base_model().model.layers[0].mlp.gate_proj) is None
    assert lora_parts(_peft(_model("llama")).get_base_model().model.layers[0].mlp.gate_proj) is not None


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_fused_loss_equals_transformers_loss(model_type):
    from swiftune_loader.patching import fused_causal_lm_loss

    model = _model(model_type)
    ids = torch.randint(1, SMALL["vocab_size"], (2, 11))
    labels = ids.clone()
    labels[:, :3] = -100
    # Gemma 2's final logit soft-capping, Granite's logits_scaling and Cohere's logit_scale (CONFIGS) must be applied
    # by the fused loss as transformers does.
    torch.testing.assert_close(
        fused_causal_lm_loss(model, {"input_ids": ids, "labels": labels}),
        model(input_ids=ids, labels=labels).loss,
        atol=1e-5,
        rtol=1e-5,
    )


def test_fused_loss_on_packed_rows_equals_transformers_training_loss():
    from swiftune_loader.patching import fused_causal_lm_loss

    model = _model("llama")
    ids = torch.randint(1, SMALL["vocab_size"], (2, 13))
    packed = torch.tensor([list(range(6)) + list(range(7))] * 2)  # two samples per row
    inputs = {"input_ids": ids, "labels": ids, "position_ids": packed}
    training_loss = model(**inputs, use_cache=False).loss  # what TRL computes: samples kept apart
    torch.testing.assert_close(fused_causal_lm_loss(model, inputs), training_loss, atol=1e-5, rtol=1e-5)
    # With the cache on, transformers attends across the packed samples: a different loss, which the fused path
    # must not reproduce.
    assert abs(model(**inputs).loss.item() - training_loss.item()) > 1e-4


def test_every_fast_path_architecture_is_tested():
    assert set(ARCHITECTURE_QUIRKS) == set(SPECS)


def _rel_error(got, reference):
    return ((got.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_patched_bf16_model_is_as_close_to_float64_as_plain_bf16(model_type):
    """bf16, loose: the patched model's logits and every LoRA gradient are as close to the float64 truth as
    transformers' own bf16 computation is.

    The bound is derived, not picked: bf16 rounding makes plain transformers err by e_plain against the same model
    in float64; the fast path rounds at different places (fused kernels keep float32 inside), so it may err
    differently, but by no more than 2 * e_plain + 2**-8 (one bf16 ulp of slack for near-zero errors).
    """
    targets = LORA_TARGETS.get(model_type, LORA_TARGETS["llama"])
    truth = _peft_with(_model(model_type, torch.float64), targets)
    plain = _peft_with(_model(model_type, torch.bfloat16), targets)
    fast = _peft_with(_model(model_type, torch.bfloat16), targets)
    patch_model(fast.get_base_model())
    ids = torch.randint(1, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    true_logits, true_grads = _loss_and_grads(truth, ids)
    plain_logits, plain_grads = _loss_and_grads(plain, ids)
    logits, grads = _loss_and_grads(fast, ids)
    assert grads.keys() == true_grads.keys() and len(grads) > 0

    def bound(plain_error):
        return 2 * plain_error + 2**-8

    assert _rel_error(logits, true_logits) <= bound(_rel_error(plain_logits, true_logits))
    for name in true_grads:
        plain_error = _rel_error(plain_grads[name], true_grads[name])
        assert _rel_error(grads[name], true_grads[name]) <= bound(plain_error), (name, plain_error)


def _peft_with(model, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, config)


# --- the recompute of a checkpointed layer skips the MLP's down projection where nothing reads its output ---------

RECOMPUTE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _recompute_lora_model(model_type: str):
    model = _model(model_type)
    patch_model(model)
    return _peft_with(model, RECOMPUTE_TARGETS).train()


def _training_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["llama", "granite", "cohere", "gemma2"])
def test_recompute_skips_the_down_projection_only_where_nothing_reads_it(monkeypatch, model_type):
    import swiftune_loader.patching.forwards as forwards
    from swiftune_loader.architectures import spec_for
    from swiftune_loader.checkpointing import disable_checkpointing, enable_checkpointing

    output_needed = []
    original = forwards.lora_mlp
    monkeypatch.setattr(
        forwards, "lora_mlp", lambda *a, **k: output_needed.append(k.get("output_needed", True)) or original(*a, **k)
    )
    ids = torch.randint(3, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    model = _recompute_lora_model(model_type)
    reference = _training_grads(model, ids)
    layers = SMALL["num_hidden_layers"]
    assert output_needed == [True] * layers

    output_needed.clear()
    base = model.get_base_model()
    enable_checkpointing(base, "offload")  # on the CPU: every layer checkpointed and recomputed
    grads = _training_grads(model, ids)
    disable_checkpointing(base)

    skips = spec_for(model_type).mlp_output_to_residual
    # Gemma 2's post-feedforward norm reads the MLP's output in backward: its recompute must compute it.
    assert skips == (model_type != "gemma2")
    assert output_needed == [True] * layers + [not skips] * layers
    assert grads.keys() == reference.keys() and any("down_proj.lora_B" in name for name in grads)
    for name, expected in reference.items():
        torch.testing.assert_close(grads[name], expected, atol=1e-6, rtol=1e-5, msg=name)
