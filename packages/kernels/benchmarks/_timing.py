"""GPU timing shared by the kernel benchmarks: CUDA-graph replay of the whole step, with do_bench kept alongside.

A fwd+bwd step of a memory-bound kernel takes ~0.2-0.5 ms on an H100, about what autograd and Python spend on the
host to launch it; timed with events around each call (triton.testing.do_bench) such a step measures the host, and
every provider looks alike. Captured once into a CUDA graph (``n`` steps unrolled, after warm-up on a side stream)
and replayed, the step runs back to back on the GPU and the time is GPU time. A provider that cannot be captured
(a host sync such as ``.item()`` inside) falls back to do_bench, and its row says so in ``timing``.
"""

from __future__ import annotations

import statistics
import time

import torch


def _do_bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _cudagraph_ms(fn, target_ms: float = 60.0, max_steps: int = 100) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as torch.cuda.graph asks (autograd, cuBLAS workspaces)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end) / 3
    steps = max(1, min(max_steps, int(target_ms / max(estimate, 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    torch.cuda.synchronize()
    graph.replay()  # first replay uploads the graph
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    del graph
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return statistics.median(times)


def time_ms(fn, on_gpu: bool, smoke: bool, graph: bool = True) -> tuple[float, dict]:
    """(ms, fields for the RESULT row): CUDA-graph time when capture works, else do_bench; both are reported."""
    if not on_gpu:
        fn()  # compile / warm up
        times = []
        for _ in range(2 if smoke else 10):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times), {"timing": "host perf_counter (CPU)"}
    do_bench = _do_bench_ms(fn)
    info = {"ms_do_bench": round(do_bench, 4)}
    if not graph:
        return do_bench, dict(info, timing="do_bench")
    try:
        ms = _cudagraph_ms(fn)
    except Exception as error:  # e.g. a host sync inside fn; do_bench still measured it
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return do_bench, dict(info, timing=f"do_bench (cuda graph capture failed: {repr(error)[:120]})")
    return ms, dict(info, timing="cudagraph")


def copy_ceiling_ms(fn, on_gpu: bool, smoke: bool) -> float:
    """Best time of a device copy over two rounds of both timings: the ceiling errs high, our % of it low.

    (Seen on an H100: CUDA-graph replays of a 512 MiB bf16 copy ran at ~2.43 TB/s, do_bench of the same copy and
    graph replays of a 128 MiB one at ~2.97 TB/s.)
    """
    times = []
    for _ in range(1 if smoke else 2):
        ms, info = time_ms(fn, on_gpu, smoke)
        times += [ms, info.get("ms_do_bench", ms)]
    return min(times)


def copy_bandwidth_gbps(device, on_gpu: bool, smoke: bool) -> float:
    """The ceiling: GB/s of a large device-to-device ``copy_`` (read + write counted), timed by
    :func:`copy_ceiling_ms`."""
    import torch

    numel = (1 << 20) if smoke else (1 << 28)  # 512 MiB of bf16 per tensor on the GPU
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = copy_ceiling_ms(lambda: dst.copy_(src), on_gpu, smoke)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def with_row_kernel(fn):
    """``fn`` run with swiftune's cross-entropy forced onto its row kernel (``CONFIG["cluster"] = False``), so that a
    run compares it with the cluster kernel that long rows get by default."""
    import importlib

    config = importlib.import_module("swiftune_kernels.cross_entropy").CONFIG

    def run(*args):
        saved = config["cluster"]
        config["cluster"] = False
        try:
            return fn(*args)
        finally:
            config["cluster"] = saved

    return run
