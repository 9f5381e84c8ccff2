"""get_peft_model(park_intermediates=True): swiftune's checkpointed layers park the fused LoRA MLP's intermediates
for their recompute (the parking itself is proven in swiftune_kernels' test_recompute_parking.py and
test_slot_parking.py); the gradients stay those of the recompute. Refused without swiftune's checkpointing:
test_cuda_graphs_option.py."""

import importlib

import torch

from swiftune_loader import FastLanguageModel

lora_mlp = importlib.import_module("swiftune_kernels.lora_mlp")


def _train_step(tiny_model_dir, monkeypatch, **options):
    """(the peft model, its adapters' gradients, the base MLP projections computed) after one step with every
    layer's input offloaded (on the CPU the "auto" policy would only recompute, and only offloaded layers park)."""
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, fast_path=True)  # the fused LoRA MLP parks
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="offload", **options)
    handle = model.base_model.model._swiftune_offload
    handle.set_modes(["offload"] * len(handle.layers))
    projections = []
    original = lora_mlp.project_forward
    monkeypatch.setattr(lora_mlp, "project_forward", lambda *a, **k: projections.append(1) or original(*a, **k))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    model(input_ids=ids, labels=ids).loss.backward()
    monkeypatch.setattr(lora_mlp, "project_forward", original)
    return model, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(projections)


def test_park_intermediates_switches_the_layers_and_keeps_the_gradients(tiny_model_dir, monkeypatch):
    model, parked, parked_calls = _train_step(tiny_model_dir, monkeypatch, park_intermediates=True)
    assert model.base_model.model._swiftune_offload.park_intermediates
    plain_model, plain, plain_calls = _train_step(tiny_model_dir, monkeypatch)
    assert not plain_model.base_model.model._swiftune_offload.park_intermediates
    layers = model.config.num_hidden_layers
    # forward gate, up, down a layer; the recompute gate and up again, unless they were parked (down is skipped)
    assert (plain_calls, parked_calls) == (5 * layers, 3 * layers)
    assert parked.keys() == plain.keys() and parked
    for name, grad in plain.items():
        torch.testing.assert_close(parked[name], grad, rtol=0, atol=0, msg=name)
