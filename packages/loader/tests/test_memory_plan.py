"""The memory-aware checkpointing plan (pure) and a model trained under it (identical gradients)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swiftune_loader.checkpointing import disable_checkpointing, enable_checkpointing, is_memory_aware
from swiftune_loader.memory_plan import LayerMemory, layer_memory, plan_checkpointing

MEMORY = LayerMemory(kept=100, checkpointed=10)


def test_everything_fits_keeps_every_layer():
    assert plan_checkpointing(4, 8, MEMORY, budget_bytes=4 * 100 * 8) == ["none"] * 4


def test_partial_budget_keeps_the_last_layers_and_recomputes_the_first():
    tokens, layers = 8, 4
    for keep in range(layers + 1):
        # Exactly enough for `keep` kept layers and the rest checkpointed; one byte less keeps one fewer.
        budget = tokens * (keep * MEMORY.kept + (layers - keep) * MEMORY.checkpointed)
        assert plan_checkpointing(layers, tokens, MEMORY, budget) == ["recompute"] * (layers - keep) + ["none"] * keep
        if keep:
            fewer = plan_checkpointing(layers, tokens, MEMORY, budget - 1, can_offload=False)
            assert fewer.count("none") == keep - 1


def test_offloading_buys_kept_layers_only_where_it_must():
    tokens, layers = 8, 4
    kept, ckpt = MEMORY.kept * tokens, MEMORY.checkpointed * tokens
    # Room for two kept layers and nothing else: the other two inputs go to the host rather than a third recompute.
    assert plan_checkpointing(layers, tokens, MEMORY, 2 * kept) == ["offload"] * 2 + ["none"] * 2
    # One more checkpoint's room: one input stays on the device, and no copy is made that buys nothing.
    assert plan_checkpointing(layers, tokens, MEMORY, 2 * kept + ckpt) == ["offload", "recompute", "none", "none"]
    # Without offloading the same budget keeps one layer fewer; a host too small for both inputs likewise.
    assert plan_checkpointing(layers, tokens, MEMORY, 2 * kept, can_offload=False).count("none") == 1
    assert plan_checkpointing(layers, tokens, MEMORY, 2 * kept, host_budget_bytes=ckpt).count("none") == 1


def test_too_little_for_recompute_offloads_the_first_layers():
    tokens, layers = 8, 5
    budget = 2 * MEMORY.checkpointed * tokens  # room for two checkpointed inputs on the device
    assert plan_checkpointing(layers, tokens, MEMORY, budget) == ["offload"] * 3 + ["recompute"] * 2
    assert plan_checkpointing(layers, tokens, MEMORY, budget, can_offload=False) == ["recompute"] * 5
    assert plan_checkpointing(layers, tokens, MEMORY, -5.0) == ["offload"] * 5


def test_offloading_stops_at_what_the_host_can_hold():
    tokens, layers = 8, 5
    checkpointed = MEMORY.checkpointed * tokens
    # The device has room for no input: all five would be offloaded, but the host holds only two.
    assert plan_checkpointing(layers, tokens, MEMORY, 0, host_budget_bytes=2 * checkpointed) == (
        ["offload"] * 2 + ["recompute"] * 3
    )
    assert plan_checkpointing(layers, tokens, MEMORY, 0, host_budget_bytes=2 * checkpointed - 1).count("offload") == 1
    assert plan_checkpointing(layers, tokens, MEMORY, 0, host_budget_bytes=0) == ["recompute"] * 5
    # A host budget larger than needed changes nothing.
    budget = 2 * checkpointed
    assert plan_checkpointing(layers, tokens, MEMORY, budget, host_budget_bytes=1e18) == (
        ["offload"] * 3 + ["recompute"] * 2
    )


def test_available_host_bytes_is_a_positive_amount():
    from swiftune_loader.checkpointing import available_host_bytes

    assert 0 < available_host_bytes() < 2**50


def test_bad_plan_arguments_are_rejected():
    with pytest.raises(ValueError, match="tokens"):
        plan_checkpointing(2, 0, MEMORY, 1e9)
    with pytest.raises(ValueError, match="num_layers"):
        plan_checkpointing(-1, 4, MEMORY, 1e9)
    with pytest.raises(ValueError, match="at least as much"):
        plan_checkpointing(2, 4, LayerMemory(kept=1, checkpointed=2), 1e9)


def test_layer_memory_follows_the_config():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    bf16 = layer_memory(config, residual_bytes=2)
    fp32_residual = layer_memory(config, residual_bytes=4)
    assert bf16.checkpointed == 64 * 2 and fp32_residual.checkpointed == 64 * 4
    assert fp32_residual.kept > bf16.kept > bf16.checkpointed
    wider = layer_memory(
        LlamaConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    )
    assert wider.kept > bf16.kept


def test_memory_aware_values():
    assert is_memory_aware("auto") and is_memory_aware(1.5) and is_memory_aware(2)
    assert not any(is_memory_aware(v) for v in (True, False, "offload", 0, -1.0, None))


def _model(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).train()


def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_budget_mode_mixes_layers_and_trains_with_identical_gradients():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = _grads(_model(), ids)
    model = _model()
    memory = layer_memory(model.config, residual_bytes=4)  # float32 embeddings: a float32 residual stream
    tokens = ids.numel()
    budget = tokens * (memory.kept + 2 * memory.checkpointed)  # one layer kept, two recomputed
    enable_checkpointing(model, budget / 2**30)
    grads = _grads(model, ids)
    assert model._swiftune_offload.modes == ["recompute", "recompute", "none"]
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)
    assert disable_checkpointing(model) == budget / 2**30
    assert "forward" not in model.model.layers[0].__dict__


def test_unchecked_layers_keep_activations_and_checkpointed_ones_do_not():
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))

    def saved_count(mode) -> int:
        model = _model()
        enable_checkpointing(model, mode)
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
        return count

    everything = saved_count(1e6)  # all kept
    tight = saved_count(1e-12)  # nothing fits: everything recomputed on the CPU
    assert everything > tight


def test_auto_mode_on_cpu_keeps_layers_when_memory_is_plentiful():
    model = _model()
    enable_checkpointing(model, "auto")
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert model._swiftune_offload.modes == ["none"] * 3  # a tiny model's activations fit the free host memory
    with torch.no_grad():
        model(input_ids=ids)  # inference does not re-plan or fail


def test_memory_aware_without_decoder_layers_is_rejected():
    with pytest.raises(ValueError, match="decoder layers"):
        enable_checkpointing(torch.nn.Linear(2, 2), "auto")
