"""Repository-wide pytest setup.

Triton decides at decoration time (module import) whether a kernel is compiled or interpreted. Without a
GPU, tests run kernels in Triton's interpreter, so it is switched on before any test imports swiftune.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist the workers share the cores: one worker's torch threads must not starve the others.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
