"""swiftune-kernels: Triton kernels with autograd for fast LLM fine-tuning.

Every op dispatches at call time: CUDA tensors run the Triton kernel; CPU tensors run the pure-torch
reference in :mod:`swiftune_kernels.reference`, unless ``TRITON_INTERPRET=1`` is set, in which case the
Triton kernel runs in Triton's interpreter (that is how CI proves the kernels without a GPU).

Importing this package touches no GPU, reads no environment variable and imports no transformers.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swiftune-kernels")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# Public ops are exported below, one line per op file.
# --- ops ---
from swiftune_kernels.cross_entropy import CrossEntropyFunction, cross_entropy
from swiftune_kernels.fused_linear_cross_entropy import FusedLinearCrossEntropyFunction, fused_linear_cross_entropy
from swiftune_kernels.gated_activation import GatedActivationFunction, gated_activation, geglu, swiglu
from swiftune_kernels.host_embedding import host_embedding, pin_table
from swiftune_kernels.layer_checkpointing import apply_offloaded_checkpointing
from swiftune_kernels.layer_norm import LayerNormFunction, layer_norm
from swiftune_kernels.lora_linear import LoRALinearFunction, lora_linear
from swiftune_kernels.lora_mlp import LoRAMLPFunction, lora_mlp
from swiftune_kernels.lora_qkv import LoRAQKVFunction, lora_qkv
from swiftune_kernels.nf4 import dequantize_nf4
from swiftune_kernels.offloaded_checkpoint import (
    OffloadedCheckpointFunction,
    offloaded_checkpoint,
    recomputing_for_backward,
)
from swiftune_kernels.rms_norm import RMSNormFunction, rms_norm
from swiftune_kernels.rope import RoPEFunction, apply_rotary_pos_emb, rope

__all__ = [
    "__version__",
    "GatedActivationFunction",
    "gated_activation",
    "swiglu",
    "geglu",
    "RoPEFunction",
    "rope",
    "apply_rotary_pos_emb",
    "LayerNormFunction",
    "layer_norm",
    "RMSNormFunction",
    "rms_norm",
    "CrossEntropyFunction",
    "cross_entropy",
    "FusedLinearCrossEntropyFunction",
    "fused_linear_cross_entropy",
    "OffloadedCheckpointFunction",
    "offloaded_checkpoint",
    "apply_offloaded_checkpointing",
    "recomputing_for_backward",
    "dequantize_nf4",
    "host_embedding",
    "pin_table",
    "LoRALinearFunction",
    "lora_linear",
    "LoRAQKVFunction",
    "lora_qkv",
    "LoRAMLPFunction",
    "lora_mlp",
]
