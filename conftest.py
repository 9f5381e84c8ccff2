"""Repository-wide pytest setup.

Triton decides at decoration time (module import) whether a kernel is compiled or interpreted. Without a
GPU, tests run kernels in Triton's interpreter, so it is switched on before any test imports swiftune.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
