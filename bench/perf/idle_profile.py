"""Where the GPU waits: one system's training step, how long the CPU takes to issue it, and the gaps in the GPU's
compute stream (from a torch profiler trace), with the kernels on either side of the largest gaps.

    python bench/perf/idle_profile.py --system swiftune --shape 8b --quant nf4 --point 2x2048

A step whose CPU issue time is close to its wall time is bound by the CPU (Python, autograd, launches), and then
faster kernels do not make it faster. Prints one RESULT line and a short table; the trace goes to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def issue_times(loss_of, model, optimizer, batch, steps: int) -> tuple[float, float]:
    """Median (CPU issue seconds, wall seconds) of ``steps`` optimizer steps."""
    import statistics

    import torch

    issue, wall = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        issue.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    return statistics.median(issue), statistics.median(wall)


def phase_times(loss_of, model, optimizer, batch, steps: int, parked: list | None = None) -> dict:
    """Median CPU issue time and GPU time (CUDA events) of each phase of a step: forward, backward, optimizer; and
    under ``per_step``, every step's values (with the tensors parked in it, when ``parked`` counts them).

    A phase whose GPU time is about its CPU issue time kept the GPU waiting on the CPU; a phase whose GPU time is
    longer let the CPU run ahead (its issue time is hidden)."""
    import statistics

    import torch

    rows: dict[str, list[float]] = {}
    for _ in range(steps):
        if parked is not None:
            parked.clear()
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        cpu = [time.perf_counter()]
        events[0].record()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = loss_of(model, batch)
        events[1].record()
        cpu.append(time.perf_counter())
        loss.backward()
        events[2].record()
        cpu.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        events[3].record()
        cpu.append(time.perf_counter())
        torch.cuda.synchronize()
        for i, name in enumerate(("forward", "backward", "optimizer")):
            rows.setdefault(f"{name}_cpu_ms", []).append((cpu[i + 1] - cpu[i]) * 1e3)
            rows.setdefault(f"{name}_gpu_ms", []).append(events[i].elapsed_time(events[i + 1]))
        if parked is not None:
            rows.setdefault("parked", []).append(sum(parked))
    out: dict = {key: round(statistics.median(values), 1) for key, values in rows.items()}
    out["per_step"] = {key: [round(v, 1) for v in values] for key, values in rows.items()}
    return out


def count_parks() -> list:
    """Wrap the parking of intermediates so that each parked tensor appends 1 to the returned list."""
    import importlib

    parking = importlib.import_module("swiftune_kernels.recompute_parking")
    counts: list = []
    park = parking.ParkingLot.park

    def counting(self, key, tensor):
        done = park(self, key, tensor)
        counts.append(int(done))
        return done

    parking.ParkingLot.park = counting
    return counts


def busiest_stream(trace: dict) -> tuple:
    """(stream id, its kernel and copy events in time order) of the stream with the most device time."""
    kernels = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy")]
    by_stream: dict = {}
    for e in kernels:
        by_stream.setdefault(e["args"].get("stream"), []).append(e)
    stream, events = max(by_stream.items(), key=lambda kv: sum(e["dur"] for e in kv[1]))
    return stream, sorted(events, key=lambda e: e["ts"])


def gap_pairs(trace: dict, top: int) -> list[dict]:
    """Idle time of the busiest stream summed by the (kernel before, kernel after) pair of each gap, largest first:
    a pair that recurs every layer shows where the CPU falls behind."""
    _, events = busiest_stream(trace)
    pairs: dict[tuple[str, str], list[float]] = {}
    for before, after in zip(events, events[1:], strict=False):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > 0:
            pairs.setdefault((before["name"][:50], after["name"][:50]), []).append(gap)
    ranked = sorted(pairs.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [{"ms": round(sum(g) / 1e3, 2), "count": len(g), "after": a, "before": b} for (a, b), g in ranked]


def stream_gaps(trace: dict, top: int) -> dict:
    """Busy and idle time of the stream with the most kernel time, and its ``top`` largest gaps."""
    stream, events = busiest_stream(trace)
    gaps, busy = [], 0.0
    for before, after in zip(events, events[1:], strict=False):
        busy += before["dur"]
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > 0:
            gaps.append((gap, before["name"][:60], after["name"][:60], before["ts"] - events[0]["ts"]))
    busy += events[-1]["dur"]
    span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
    gaps.sort(reverse=True)
    small = sum(g for g, *_ in gaps if g < 20)
    return {
        "stream": stream,
        "span_ms": span / 1e3,
        "busy_ms": busy / 1e3,
        "idle_ms": (span - busy) / 1e3,
        "idle_in_gaps_under_20us_ms": small / 1e3,
        "gaps": [{"us": round(g), "at_ms": round(t / 1e3, 1), "after": b, "before": a} for g, b, a, t in gaps[:top]],
    }


def setup(args) -> tuple:
    """(model, loss_of, optimizer, batch) of ``args.system`` on the saved random model of ``args.shape``."""
    import train_one
    from common import model_folder, optimizer_for, random_batch

    train_one.CHECKPOINTING.update(
        mode=train_one._checkpoint_mode(args.checkpointing),
        no_skip=False,
        park=train_one._park_projections(args.park),
        graphs=args.graphs,
        offload_embeddings=args.offload_embeddings,
    )
    folder = model_folder(args.shape, os.environ.get("SWIFTUNE_BENCH_MODELS", "/tmp/swiftune-bench-models"))
    model, loss_of = train_one.build(args.system, folder, args.quant == "nf4", 131072)
    batch_size, seq = (int(v) for v in args.point.split("x"))
    batch = random_batch(train_one._inner(model).config.vocab_size, batch_size, seq)
    return model, loss_of, optimizer_for(model), batch


def step_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options of :func:`setup`: system, shape, quantization, BATCHxSEQ point, checkpointing
    (budget, parking, graphs)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", default="swiftune")
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--quant", choices=("bf16", "nf4"), default="nf4")
    parser.add_argument("--point", default="2x2048")
    parser.add_argument("--checkpointing", default=None, help="swiftune: auto, true, offload or a GiB budget")
    parser.add_argument("--park", default="", help="swiftune: park these MLP projections for the recompute (gate,up)")
    parser.add_argument("--graphs", action="store_true", help="swiftune: checkpointed layers replayed from CUDA graphs")
    parser.add_argument("--offload-embeddings", action="store_true", help="the input embedding in host memory")
    return parser


def main() -> None:
    parser = step_arguments(__doc__)
    parser.add_argument("--gaps", type=int, default=12)
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    model, loss_of, optimizer, batch = setup(args)
    issue_times(loss_of, model, optimizer, batch, 3)  # warm-up
    issue, wall = issue_times(loss_of, model, optimizer, batch, 5)
    # Before the profiler: once it has run, every later step of the process is slower (by ~30% on the H100 host of
    # 2026-11-24), which made the per-phase times of earlier versions disagree with the wall time above.
    parked = count_parks() if args.park else None
    phases = phase_times(loss_of, model, optimizer, batch, 10, parked)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        issue_times(loss_of, model, optimizer, batch, 1)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"trace-{args.system}-{args.shape}-{args.quant}.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    gaps, pairs = stream_gaps(trace, args.gaps), gap_pairs(trace, args.gaps)
    path.unlink()  # large; the summary is what comes back
    per_step = phases.pop("per_step")
    result = {"system": args.system, "shape": args.shape, "quant": args.quant, "point": args.point}
    result.update(checkpointing=args.checkpointing, park=args.park, graphs=args.graphs)
    result.update(issue_ms=round(issue * 1e3, 1), wall_ms=round(wall * 1e3, 1), **phases, **gaps, gap_pairs=pairs)
    result["per_step"] = per_step
    print("RESULT " + json.dumps(result), flush=True)
    print(
        f"{args.system} {args.shape} {args.quant} {args.point} ckpt={args.checkpointing}"
        f" park={args.park or 'none'}{' graphs' if args.graphs else ''}: wall {wall * 1e3:.1f} ms,"
        f" CPU issue {issue * 1e3:.1f} ms;"
        f" compute stream busy {gaps['busy_ms']:.1f} of {gaps['span_ms']:.1f} ms (idle {gaps['idle_ms']:.1f}, of it"
        f" {gaps['idle_in_gaps_under_20us_ms']:.1f} in gaps under 20 us)"
    )
    print("  phases (ms, median): " + ", ".join(f"{k} {v}" for k, v in phases.items()))
    for key in ("forward_gpu_ms", "backward_gpu_ms", "parked"):
        if key in per_step:
            print(f"  per step {key}: {per_step[key]}")
    for g in gaps["gaps"]:
        print(f"  {g['us']:>7} us at {g['at_ms']:>7.1f} ms  after {g['after']}  before {g['before']}")
    print("  idle by kernel pair (profiled step):")
    for p in pairs:
        print(f"  {p['ms']:>7.2f} ms in {p['count']:>4} gaps  after {p['after']}  before {p['before']}")


if __name__ == "__main__":
    main()
