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

__all__ = ["__version__"]
