"""Where a training step reaches its peak GPU memory: the forward, each checkpointed layer's backward (recompute
included), and the stretches of backward between them (the loss, kept layers), as GiB above the step's start.

    python bench/perf/peak_phases.py --shape 8b --quant nf4 --point 2x2048 --checkpointing 0.6 [--graphs]

A memory pool held apart (the layer graphs') adds to whichever phase peaks; this shows which one does.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30


def main() -> None:
    import idle_profile
    import torch

    args = idle_profile.step_arguments(__doc__).parse_args()
    model, loss_of, optimizer, batch = idle_profile.setup(args)
    idle_profile.issue_times(loss_of, model, optimizer, batch, 4)  # warm-up (and the graphs' captures)
    checkpoint = importlib.import_module("swiftune_kernels.offloaded_checkpoint").OffloadedCheckpointFunction
    segments: list[tuple[str, float]] = []
    original = checkpoint.backward

    def close(label: str) -> None:
        torch.cuda.synchronize()
        segments.append((label, (torch.cuda.max_memory_allocated() - base) / GIB))
        torch.cuda.reset_peak_memory_stats()

    def probed(ctx, *grads):
        close("between")
        result = original(ctx, *grads)
        close(f"layer {'offload' if ctx.offloaded else 'recompute'}")
        return result

    checkpoint.backward = staticmethod(probed)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        loss = loss_of(model, batch)
    close("forward")
    loss.backward()
    close("between")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    close("optimizer")
    checkpoint.backward = original
    graphs = sys.modules.get("swiftune_kernels.layer_graphs")
    pool = graphs.graph_pool_bytes() / GIB if graphs else 0.0
    print(f"step start {base / GIB:.2f} GiB allocated; graph pool {pool:.3f} GiB")
    top = max(segments, key=lambda s: s[1])
    for i, (label, peak) in enumerate(segments):
        if peak > top[1] - 0.25 or label != "layer offload":
            print(f"  {i:>3} {label:<18} peak +{peak:.3f} GiB{'  <- step peak' if (label, peak) == top else ''}")
    print(f"peak {base / GIB + top[1]:.2f} GiB allocated (+ pool {base / GIB + top[1] + pool:.2f})")


if __name__ == "__main__":
    main()
