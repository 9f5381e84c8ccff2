"""A rough estimate of training memory, and the memory the device has, for ``swiftune train --dry-run``.

The estimate adds four parts:

- weights: parameters x bytes per weight; with 4-bit loading the decoder's linear weights take 4.5 bits each (NF4
  plus block scales), with 8-bit one byte; embeddings, norms and the output head stay in the load dtype.
- trainable state: per trained parameter a float32 copy, its gradient and Adam's two moments (16 bytes) for LoRA;
  in full fine-tuning a gradient in the load dtype plus two float32 moments per parameter.
- activations: per token and decoder layer about 17 x hidden values kept for backward (the activation count of
  Korthikanti et al., 2022, without the attention scores that fused attention never stores); with gradient
  checkpointing only each layer's input is kept, plus one layer's worth while it is recomputed.
- overhead: the CUDA context and workspaces on a GPU, the Python process and its libraries on the CPU.

The fused loss works through the vocabulary in chunks, so no full-vocabulary logits are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_OVERHEAD = {"cuda": int(0.75 * GIB), "cpu": int(0.5 * GIB)}
ACTIVATION_VALUES_PER_HIDDEN = 17
# A run is said to fit when the estimate stays under this share of the free memory (allocators fragment).
FIT_SHARE = 0.9


@dataclass
class MemoryEstimate:
    """Bytes of each part of the estimate."""

    weights: int
    trainable_state: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.activations + self.overhead


def estimate_training_memory(
    facts, config: dict, trainable_parameters: int, dtype: str, device: str, checkpointing: bool
) -> MemoryEstimate:
    """Estimate the memory of a training run.

    Args:
        facts: the model's :class:`swiftune_cli.model_facts.ModelFacts`.
        config: the ``swiftune train`` settings (batch_size, max_seq_length, load_in_4bit/8bit, full_finetuning).
        trainable_parameters: LoRA parameters (ignored in full fine-tuning, where every parameter trains).
        dtype: the load dtype name (``bfloat16``, ``float16``, ``float32``).
        device: ``cuda`` or ``cpu``.
        checkpointing: gradient checkpointing is on.
    """
    width = _DTYPE_BYTES[dtype]
    decoder_linear = sum(i * o for name, i, o in facts.linear_layers if name != "lm_head")
    if config["load_in_4bit"]:
        per_linear_weight = 4.5 / 8
    elif config["load_in_8bit"]:
        per_linear_weight = 1.0
    else:
        per_linear_weight = width
    weights = int(decoder_linear * per_linear_weight + (facts.parameters - decoder_linear) * width)
    if config["full_finetuning"]:
        trainable_state = facts.parameters * (width + 8)
    else:
        trainable_state = trainable_parameters * 16
    tokens = config["batch_size"] * config["max_seq_length"]
    per_layer = tokens * ACTIVATION_VALUES_PER_HIDDEN * facts.hidden_size * width
    if checkpointing:
        activations = tokens * facts.hidden_size * width * facts.num_layers + per_layer
    else:
        activations = per_layer * facts.num_layers
    return MemoryEstimate(weights, trainable_state, activations, _OVERHEAD[device])


def device_memory() -> tuple[int, str]:
    """Free memory of the device training would use, in bytes, and its description.

    The first GPU's free memory when there is one; else the RAM available to new processes.
    """
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return free, f"free on {torch.cuda.get_device_name(0)}"
    from swiftune_loader.checkpointing import available_host_bytes

    return int(available_host_bytes()), "RAM available"


def format_gib(size: int) -> str:
    """Bytes as ``1.23 GiB`` (or MiB below 1 GiB)."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 1024**2:.1f} MiB"
