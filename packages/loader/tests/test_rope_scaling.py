"""max_seq_length beyond the model's positions stretches RoPE on the config, and the fast path follows it."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma3TextConfig

from swiftune_loader import FastLanguageModel
from swiftune_loader.rope_scaling import extend_rope_to
from swiftune_loader.testing import build_tiny_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 10000.0,
}


@pytest.fixture(scope="module")
def short_models(tmp_path_factory):
    """Two tiny Llamas with 32 positions: plain RoPE, and Llama 3.1-style rope_type "llama3"."""
    tokenizer = build_chat_tokenizer()
    root = tmp_path_factory.mktemp("short-rope")
    return {
        "default": build_tiny_model(root / "default", tokenizer, max_position_embeddings=32),
        "llama3": build_tiny_model(
            root / "llama3", tokenizer, max_position_embeddings=32, rope_parameters=dict(LLAMA3_ROPE)
        ),
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("default", {"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0}),
        ("llama3", {**LLAMA3_ROPE, "factor": 8.0 * 2.5}),  # type and smoothing kept, factor raised
    ],
)
def test_long_max_seq_length_stretches_rope_and_the_fast_path_follows(short_models, caplog, kind, expected):
    with caplog.at_level(logging.WARNING):
        fast, _ = FastLanguageModel.from_pretrained(short_models[kind], max_seq_length=80, fast_path=True)
    assert fast.config.rope_parameters == expected
    assert fast.config.max_position_embeddings == 80
    lines = [r.getMessage() for r in caplog.records if "RoPE scaling" in r.getMessage()]
    assert len(lines) == 1 and f"{expected['rope_type']} factor {expected['factor']:g}" in lines[0]
    plain, _ = FastLanguageModel.from_pretrained(short_models[kind], max_seq_length=80, fast_path=False)
    unscaled, _ = FastLanguageModel.from_pretrained(short_models[kind], max_seq_length=32)
    assert unscaled.config.rope_parameters["rope_type"] == kind  # no stretching within the model's positions
    ids = torch.randint(3, 200, (2, 60), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(fast, ids), _logits(plain, ids), atol=1e-4, rtol=1e-4)
    # The scaling reached the model's rotary embedding, not only its config: linear divides every frequency by the
    # factor; llama3 divides its lowest frequencies by it (and blends the middle ones).
    scaled_freq, unscaled_freq = plain.model.rotary_emb.inv_freq, unscaled.model.rotary_emb.inv_freq
    if kind == "default":
        torch.testing.assert_close(scaled_freq, unscaled_freq / 2.5)
    else:
        torch.testing.assert_close(scaled_freq[-1], unscaled_freq[-1] * 8.0 / 20.0)


def test_users_rope_scaling_wins_and_keeps_the_models_theta(short_models, caplog):
    with caplog.at_level(logging.WARNING):
        model, _ = FastLanguageModel.from_pretrained(
            short_models["default"], max_seq_length=80, rope_scaling={"type": "dynamic", "factor": 2.0}
        )
    assert model.config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert model.config.max_position_embeddings == 32 and "RoPE scaling" not in caplog.text


def test_bad_rope_scaling_is_refused(short_models):
    with pytest.raises(ValueError, match="rope_scaling must be a dict with a 'rope_type'"):
        FastLanguageModel.from_pretrained(short_models["default"], rope_scaling={"factor": 2.0})


def test_dynamic_rope_is_left_to_stretch_by_itself():
    config = SimpleNamespace(max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert "stretches by itself" in extend_rope_to(config, 64)
    assert config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0} and config.max_position_embeddings == 32


def test_rope_that_cannot_be_stretched_is_left_with_a_warning(caplog):
    rope = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [4.0], "original_max_position_embeddings": 8}
    config = SimpleNamespace(max_position_embeddings=32, rope_parameters=dict(rope))
    with caplog.at_level(logging.WARNING):
        extend_rope_to(config, 64)
    assert "cannot be stretched" in caplog.text and config.rope_parameters == rope


def test_within_the_models_positions_nothing_changes():
    config = SimpleNamespace(max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 1.0})
    assert extend_rope_to(config, 32) is None and config.rope_parameters["rope_type"] == "default"


def test_per_layer_type_rope_stretches_the_global_layers_only():
    config = Gemma3TextConfig(max_position_embeddings=1024)
    sliding = dict(config.rope_parameters["sliding_attention"])
    extend_rope_to(config, 4096)
    assert config.rope_parameters["full_attention"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}
    assert config.rope_parameters["sliding_attention"] == sliding
