"""Model facts read without weights, and the rough training-memory estimate built on them."""

import json

import pytest

from swiftune_cli.config_schema import defaults
from swiftune_cli.memory_estimate import ACTIVATION_VALUES_PER_HIDDEN, GIB, estimate_training_memory
from swiftune_cli.model_facts import lora_parameter_count, read_model_facts

LLAMA_3_8B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def llama_8b_facts(tmp_path_factory):
    """Llama-3-8B's config.json with no weights: its facts come from a model on the meta device."""
    folder = tmp_path_factory.mktemp("llama-8b-shape")
    (folder / "config.json").write_text(json.dumps(LLAMA_3_8B))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # an empty header
    return read_model_facts(folder)


def test_llama_8b_facts_from_config_alone(llama_8b_facts):
    facts = llama_8b_facts
    h, i, kv, layers, vocab = 4096, 14336, 1024, 32, 128256
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    assert facts.parameters == layers * per_layer + 2 * vocab * h + h == 8_030_261_248
    assert facts.fast_path and facts.model_type == "llama" and facts.quantization is None
    count, targets = lora_parameter_count(facts, 16, None)
    assert targets == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert count == layers * 16 * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
    only_q, _ = lora_parameter_count(facts, 8, ["q_proj"])
    assert only_q == layers * 8 * (h + h)
    with pytest.raises(ValueError, match="No linear layer of this model matches"):
        lora_parameter_count(facts, 8, ["query_key_value"])


def test_estimate_parts_follow_the_stated_formula(llama_8b_facts):
    facts = llama_8b_facts
    config = {**defaults(), "batch_size": 2, "max_seq_length": 1024}
    decoder_linear = sum(i * o for name, i, o in facts.linear_layers if name != "lm_head")
    lora = 1_000_000
    bf16 = estimate_training_memory(facts, config, lora, "bfloat16", "cuda", checkpointing=True)
    assert bf16.weights == facts.parameters * 2
    assert bf16.trainable_state == lora * 16
    tokens, h = 2 * 1024, 4096
    assert bf16.activations == tokens * h * 2 * 32 + tokens * ACTIVATION_VALUES_PER_HIDDEN * h * 2
    no_checkpointing = estimate_training_memory(facts, config, lora, "bfloat16", "cuda", checkpointing=False)
    assert no_checkpointing.activations == tokens * ACTIVATION_VALUES_PER_HIDDEN * h * 2 * 32

    nf4 = estimate_training_memory(facts, {**config, "load_in_4bit": True}, lora, "bfloat16", "cuda", True)
    assert nf4.weights == int(decoder_linear * 4.5 / 8 + (facts.parameters - decoder_linear) * 2)
    # QLoRA keeps Llama-3-8B's embeddings and head in 16 bits: about 5.6 GiB of weights, against 15 in bf16.
    assert 5.4 * GIB < nf4.weights < 5.8 * GIB and 14.9 * GIB < bf16.weights < 15.0 * GIB
    int8 = estimate_training_memory(facts, {**config, "load_in_8bit": True}, lora, "bfloat16", "cuda", True)
    assert nf4.weights < int8.weights < bf16.weights

    full = estimate_training_memory(facts, {**config, "full_finetuning": True}, lora, "bfloat16", "cuda", True)
    assert full.trainable_state == facts.parameters * (2 + 8)
    assert full.total == full.weights + full.trainable_state + full.activations + full.overhead


def test_float32_doubles_weights_and_activations(llama_8b_facts):
    config = {**defaults(), "batch_size": 1, "max_seq_length": 256}
    half = estimate_training_memory(llama_8b_facts, config, 0, "bfloat16", "cpu", False)
    full = estimate_training_memory(llama_8b_facts, config, 0, "float32", "cpu", False)
    assert full.weights == 2 * half.weights and full.activations == 2 * half.activations
