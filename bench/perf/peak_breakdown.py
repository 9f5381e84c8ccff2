"""What is alive at a training step's memory peak: the allocations made during one step and still held at its
peak, summed by the line of our code (or of transformers, peft, torch.optim) that made them.

    python bench/perf/peak_breakdown.py --shape 8b --quant nf4 --point 2x2048 --checkpointing 0.6 [--graphs]

What was allocated before the step (weights, adapters, optimizer state) is one line; a memory pool held apart (the
layer graphs') is another. It replays the CUDA caching allocator's own trace of the step
(``torch.cuda.memory._record_memory_history``), so it sees every tensor, not only those Python still names.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_trace import active_blocks, held_peak, pool_ranges  # noqa: E402

GIB = 2**30
# Frames from these files say who asked for the memory; the first such frame (innermost) names an allocation.
OURS = ("swiftune_", "bench/perf", "transformers/", "peft/", "torch/optim", "torch/autograd")


def owner(frames: list[dict]) -> str:
    """``file:line function`` of the innermost frame in code that decides what to allocate."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(part in name for part in OURS):
            short = name.split("site-packages/")[-1].split("/src/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "(other)" if frames else "(C++ only: autograd engine or kernel workspace)"


def live_at_peak(before: dict[int, int], events: list[dict]) -> tuple[int, int, dict[int, dict]]:
    """(bytes allocated at the peak, the trace index of the peak, the allocations made in the trace and alive at
    the peak by address), replaying the trace from the blocks ``before`` it."""
    sizes = dict(before)
    current = peak = sum(sizes.values())
    peak_index = -1
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            sizes[event["addr"]] = event["size"]
            current += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in sizes:
            current -= sizes.pop(event["addr"])
        if current > peak:
            peak, peak_index = current, i
    live: dict[int, dict] = {}
    for event in events[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    return peak, peak_index, live


def main() -> None:
    import idle_profile
    import torch

    parser = idle_profile.step_arguments(__doc__)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument(
        "--warm-steps", type=int, default=4, help="steps before the traced one (1: trace the graphs' capture step)"
    )
    args = parser.parse_args()
    model, loss_of, optimizer, batch = idle_profile.setup(args)
    for step in range(args.warm_steps):  # warm-up (and the graphs' captures)
        torch.cuda.reset_peak_memory_stats()
        idle_profile.issue_times(loss_of, model, optimizer, batch, 1)
        graphs = sys.modules.get("swiftune_kernels.layer_graphs")
        pool = graphs.graph_pool_bytes() if graphs else 0
        print(
            f"  warm-up step {step}: peak {torch.cuda.max_memory_allocated() / GIB:.3f} GiB allocated, pool free"
            f" {pool / GIB:.3f} GiB, sum {(torch.cuda.max_memory_allocated() + pool) / GIB:.3f} GiB"
        )
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    first = torch.cuda.memory._snapshot()
    before = active_blocks(first)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    idle_profile.issue_times(loss_of, model, optimizer, batch, 1)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_allocated = torch.cuda.max_memory_allocated()
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak, peak_index, live = live_at_peak(before, events)
    made_peak = owner(events[peak_index].get("frames", [])) if peak_index >= 0 else "(before the step)"
    by_owner: dict[str, list[int]] = {}
    for event in live.values():
        by_owner.setdefault(owner(event.get("frames", [])), []).append(event["size"])
    graphs = sys.modules.get("swiftune_kernels.layer_graphs")
    pool = graphs.graph_pool_bytes() if graphs else 0
    print(
        f"{args.shape} {args.quant} {args.point} ckpt={args.checkpointing} graphs={args.graphs}: step start"
        f" {start / GIB:.3f} GiB, peak {peak_allocated / GIB:.3f} GiB allocated (replayed trace: {peak / GIB:.3f}),"
        f" graph pool {pool / GIB:.3f} GiB, total {(peak_allocated + pool) / GIB:.3f} GiB"
    )
    print(f"  the peak: event {peak_index} of {len(events)}, an allocation by {made_peak}")
    if graphs and graphs._POOLS:  # the pool's segments and free blocks, largest first: what could shrink it
        pools = set(graphs._POOLS.values())
        segments = [s for s in snapshot["segments"] if tuple(s.get("segment_pool_id", ())) in pools]
        sizes = sorted((s["total_size"] >> 20 for s in segments), reverse=True)
        free = sorted(
            (b["size"] >> 20 for s in segments for b in s["blocks"] if not b["state"].startswith("active")),
            reverse=True,
        )
        print(f"  graph pool segments (MiB): {sizes[:24]}; free blocks (MiB): {free[:24]}")
        before_pool = sum(end - start for start, end in pool_ranges(first, pools))
        held, held_index = held_peak(before, before_pool, events, pool_ranges(snapshot, pools))
        held_by = owner(events[held_index].get("frames", [])) if held_index >= 0 else "(before the step)"
        print(
            f"  held (allocated outside the pool + the pool's segments, event by event): peak {held / GIB:.3f} GiB"
            f" at event {held_index}, an allocation by {held_by}"
        )
    ranked = sorted(by_owner.items(), key=lambda kv: -sum(kv[1]))
    for name, sizes in ranked[: args.top]:
        print(f"  {sum(sizes) / 2**20:>9.1f} MiB in {len(sizes):>4} blocks  {name}")
    rest = sum(sum(sizes) for _, sizes in ranked[args.top :])
    print(f"  {rest / 2**20:>9.1f} MiB in the other {max(0, len(ranked) - args.top)} places")


if __name__ == "__main__":
    main()
