"""get_peft_model(cuda_graphs=True): swiftune's checkpointed layers switch to CUDA-graph replay (the replays themselves
are proven in swiftune_kernels' tests/test_layer_graphs.py); without swiftune's checkpointing it is refused, as
park_intermediates is (test_park_intermediates_option.py)."""

import pytest
import torch

from swiftune_loader import FastLanguageModel


def test_cuda_graphs_switch_the_checkpointed_layers_to_graphs(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="offload", cuda_graphs=True)
    handle = model.base_model.model._swiftune_offload
    assert handle.cuda_graphs
    ids = torch.randint(0, model.config.vocab_size, (2, 12)).to(model.device)
    for _ in range(3):  # on the CPU the layers stay eager; on a GPU the third call replays
        model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("option", ["cuda_graphs", "park_intermediates"])
@pytest.mark.parametrize("mode", [True, False])
def test_options_of_swiftune_checkpointing_without_it_are_refused_before_any_change(tiny_model_dir, mode, option):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=option):
        FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode, **{option: True})
    assert not hasattr(model, "peft_config") and model.get_input_embeddings().weight.requires_grad
