"""What a run holds on the GPU, replayed from the CUDA caching allocator's own trace
(``torch.cuda.memory._record_memory_history``): tensors allocated, plus whatever memory pools held apart (the layer
graphs') have reserved.

``torch.cuda.max_memory_allocated`` plus the pools' free blocks at the end is an upper bound of that, exact while
the pools do not change, but it counts twice what a graph capture allocates from a pool: those blocks are
allocated (so in the maximum) during the capture, and free in the pool (so in its free blocks) after it. The replay
here adds, at every allocation, the step's tensors outside the pools to the pools' reserved size at that moment.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_ENTRIES = 4_000_000


def active_blocks(snapshot: dict) -> dict[int, int]:
    """{address: size} of the blocks allocated when ``snapshot`` was taken (all pools, graph pools included)."""
    blocks = {}
    for segment in snapshot["segments"]:
        address = segment["address"]
        for block in segment["blocks"]:
            if block["state"].startswith("active"):
                blocks[address] = block["size"]
            address += block["size"]
    return blocks


def pool_ranges(snapshot: dict, pools: Iterable[tuple]) -> list[tuple[int, int]]:
    """(start, end) of every segment of the memory pools ``pools`` in ``snapshot``."""
    pools = set(pools)
    return [
        (s["address"], s["address"] + s["total_size"])
        for s in snapshot["segments"]
        if tuple(s.get("segment_pool_id", ())) in pools
    ]


def held_peak(before: dict[int, int], pool_before: int, events: list[dict], ranges: list[tuple[int, int]]):
    """(peak bytes, trace index of the peak; -1: before the trace) of the tensors outside the pools plus the pools'
    reserved segments, replaying ``events`` from the blocks ``before`` and ``pool_before`` reserved bytes.

    ``ranges`` are the pools' segments at the end of the trace (a pool's segments are not given back while its graphs
    live, so these cover every pool segment the trace made).
    """

    def in_pool(address: int) -> bool:
        return any(start <= address < end for start, end in ranges)

    sizes = {a: s for a, s in before.items() if not in_pool(a)}
    current = sum(sizes.values()) + pool_before
    peak, peak_index = current, -1
    for i, event in enumerate(events):
        action, address = event["action"], event["addr"]
        if action == "segment_alloc" and in_pool(address):
            current += event["size"]
        elif action == "segment_free" and in_pool(address):
            current -= event["size"]
        elif action == "alloc" and not in_pool(address):
            sizes[address] = event["size"]
            current += event["size"]
        elif action == "free_completed" and address in sizes:
            current -= sizes.pop(address)
        if current > peak:
            peak, peak_index = current, i
    return peak, peak_index


class HeldRecorder:
    """Records the allocator's trace between :meth:`start` and :meth:`stop` (without stacks: cheap) and returns the
    peak of what was held over it (:func:`held_peak`), the pools of the layer graphs counted whole."""

    def __init__(self, pools: Iterable[tuple] | None = None) -> None:
        self.pools = pools

    def start(self) -> None:
        import torch

        torch.cuda.synchronize()
        self._first = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=MAX_ENTRIES)

    def stop(self) -> int:
        import torch

        torch.cuda.synchronize()
        last = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        pools = self.pools if self.pools is not None else graph_pools()
        ranges = pool_ranges(last, pools)
        before_pool = sum(end - start for start, end in pool_ranges(self._first, pools))
        events = last["device_traces"][torch.cuda.current_device()]
        if len(events) >= MAX_ENTRIES:  # the ring buffer wrapped: its first events, and so the replay, are lost
            raise RuntimeError(f"the allocator's trace filled its {MAX_ENTRIES} entries; record fewer steps")
        peak, _ = held_peak(active_blocks(self._first), before_pool, events, ranges)
        return peak


def graph_pools() -> set:
    """The memory pools of swiftune's layer graphs (none when swiftune did not run in this process)."""
    import sys

    graphs = sys.modules.get("swiftune_kernels.layer_graphs")
    return set(graphs._POOLS.values()) if graphs is not None else set()
