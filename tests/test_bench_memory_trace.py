"""The benchmark's held-memory replay (bench/perf/memory_trace.py): tensors outside the graphs' pool plus the pool's
reserved segments, event by event, without counting twice what a capture allocates from the pool."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "perf"))

from memory_trace import active_blocks, held_peak, pool_ranges  # noqa: E402

WEIGHTS, POOL, CAPTURE_TEMP, EAGER_TEMP, OUTPUT = 100, 50, 30, 20, 40
POOL_AT, WEIGHTS_AT = 5000, 1000


def _snapshot(pool_id=(0, 1)) -> dict:
    return {
        "segments": [
            {"address": WEIGHTS_AT, "total_size": WEIGHTS + 28, "segment_pool_id": (0, 0),
             "blocks": [{"size": WEIGHTS, "state": "active_allocated"}, {"size": 28, "state": "inactive"}]},
            {"address": POOL_AT, "total_size": POOL, "segment_pool_id": pool_id,
             "blocks": [{"size": POOL, "state": "inactive"}]},
        ]
    }  # fmt: skip


def _capture_step() -> list[dict]:
    """A capture that grows the pool and allocates a temporary there, an eager temporary beside it, and the
    replay's output: the trace's actions as the allocator writes them."""
    return [
        {"action": "segment_alloc", "addr": POOL_AT, "size": POOL},
        {"action": "alloc", "addr": POOL_AT, "size": CAPTURE_TEMP},
        {"action": "alloc", "addr": 2000, "size": EAGER_TEMP},
        {"action": "free_completed", "addr": POOL_AT, "size": CAPTURE_TEMP},
        {"action": "free_completed", "addr": 2000, "size": EAGER_TEMP},
        {"action": "alloc", "addr": 3000, "size": OUTPUT},
    ]


def test_active_blocks_and_pool_ranges_read_a_snapshot():
    snapshot = _snapshot()
    assert active_blocks(snapshot) == {WEIGHTS_AT: WEIGHTS}
    assert pool_ranges(snapshot, {(0, 1)}) == [(POOL_AT, POOL_AT + POOL)]
    assert pool_ranges(snapshot, {(9, 9)}) == []


def test_a_capture_s_pool_blocks_count_once_as_the_pool_s_segment():
    events = _capture_step()
    peak, index = held_peak({WEIGHTS_AT: WEIGHTS}, 0, events, pool_ranges(_snapshot(), {(0, 1)}))
    assert peak == WEIGHTS + POOL + OUTPUT  # the whole pool once, and the output: never the capture's block again
    assert index == len(events) - 1
    # the upper bound (the most allocated, pool blocks included, plus the pool's free blocks at the end) is larger
    allocated = most = WEIGHTS
    for event in events:
        allocated += {"alloc": event["size"], "free_completed": -event["size"]}.get(event["action"], 0)
        most = max(most, allocated)
    assert most + POOL > peak


def test_with_no_pool_held_is_the_most_allocated():
    events = [e for e in _capture_step() if e["addr"] != POOL_AT]
    peak, _ = held_peak({WEIGHTS_AT: WEIGHTS}, 0, events, [])
    assert peak == WEIGHTS + max(EAGER_TEMP, OUTPUT)


def test_a_pool_reserved_before_the_trace_counts_from_the_start():
    peak, index = held_peak({WEIGHTS_AT: WEIGHTS}, POOL, [], [(POOL_AT, POOL_AT + POOL)])
    assert (peak, index) == (WEIGHTS + POOL, -1)
