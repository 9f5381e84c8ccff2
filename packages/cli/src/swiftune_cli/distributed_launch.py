"""``swiftune train --num-gpus N``: start N training processes with torchrun, one per GPU, and wait for them.

Each process runs ``swiftune train`` again (without ``--num-gpus``) under torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), from which the Trainer sets up DDP; rank 0 alone prints the
progress and writes the adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys

# The cli package runs as a module through its main.py (the package has no __main__.py).
CLI_MODULE = "swiftune_cli"
# Set to 1 to let --num-gpus start CPU processes (gloo) on a machine without CUDA: for tests, not for training.
ALLOW_CPU_ENV = "SWIFTUNE_ALLOW_CPU_DISTRIBUTED"


def torchrun_command(num_gpus: int, argv: list[str]) -> list[str]:
    """The command that runs ``swiftune train *argv`` in ``num_gpus`` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={num_gpus}",
        "-m",
        CLI_MODULE,
        "train",
        *argv,
    ]


def check_num_gpus(num_gpus: int, cuda_devices: int, allow_cpu: bool) -> None:
    """Raise a ValueError a user can act on when ``num_gpus`` processes cannot run here.

    Args:
        num_gpus: processes asked for (--num-gpus).
        cuda_devices: CUDA devices visible here (0 without CUDA).
        allow_cpu: CPU processes are allowed where there is no CUDA device (``SWIFTUNE_ALLOW_CPU_DISTRIBUTED=1``).
    """
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"--num-gpus must be a positive integer, got {num_gpus!r}.")
    if cuda_devices == 0:
        if not allow_cpu:
            raise ValueError(
                f"--num-gpus {num_gpus} needs CUDA GPUs and none is visible here; drop --num-gpus to train on one "
                f"device (or set {ALLOW_CPU_ENV}=1 to test with CPU processes)."
            )
        return
    if num_gpus > cuda_devices:
        raise ValueError(
            f"--num-gpus {num_gpus} asks for more GPUs than the {cuda_devices} visible here; pass --num-gpus "
            f"{cuda_devices} or fewer (CUDA_VISIBLE_DEVICES chooses which)."
        )


def relaunch_with_torchrun(num_gpus: int, argv: list[str]) -> int:
    """Run ``swiftune train *argv`` in ``num_gpus`` processes with torchrun; return torchrun's exit status.

    Args:
        num_gpus: the number of processes, one per GPU.
        argv: the ``train`` arguments for the workers, without ``--num-gpus`` (they must not relaunch).

    Raises:
        ValueError: more GPUs than are visible, or no GPU (see :func:`check_num_gpus`).
    """
    import torch

    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_num_gpus(num_gpus, cuda_devices, allow_cpu=os.environ.get(ALLOW_CPU_ENV) == "1")
    env = dict(os.environ)
    if cuda_devices == 0:
        # Without CUDA the workers train on the CPU; accelerate then sets up the gloo backend.
        env.setdefault("ACCELERATE_USE_CPU", "true")
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, set here to keep its banner quiet
    return subprocess.run(torchrun_command(num_gpus, list(argv)), env=env, check=False).returncode
