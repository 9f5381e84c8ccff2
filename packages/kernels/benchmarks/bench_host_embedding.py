"""Benchmark the embedding lookup from a page-locked host table against lookups from a table on the GPU.

Providers:
- eager: ``torch.nn.functional.embedding`` with the table on the GPU (what the host table saves: its GPU memory);
- compile: torch.compile of that same lookup;
- host-gather: the ids copied to the host, a CPU gather, and the rows copied back (a lookup hook that keeps the
  table on the CPU; it waits for the device once per call);
- ours: :func:`swiftune_kernels.host_embedding` (the GPU reads the rows over the link; no host wait).
Reported as ms and as GB/s of the rows moved, next to the host-to-device copy bandwidth measured in the same run.
Prints one ``RESULT {json}`` line per measurement and a table.

    uv run python packages/kernels/benchmarks/bench_host_embedding.py                 # GPU, 128256 x 4096, 4096 ids
    uv run python packages/kernels/benchmarks/bench_host_embedding.py --smoke         # tiny, CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from _timing import time_ms


def _host_to_device_gbps(nbytes: int, on_gpu: bool, smoke: bool) -> float | None:
    if not on_gpu:
        return None
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms, _ = time_ms(lambda: target.copy_(source, non_blocking=True), on_gpu, smoke, graph=False)
    return nbytes / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="128256x4096", help="VOCABxHIDDEN")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from swiftune_kernels import host_embedding, pin_table

    vocab, hidden = (int(v) for v in ("1000x64" if args.smoke else args.shape).split("x"))
    tokens = 64 if args.smoke else args.tokens
    device = "cuda" if on_gpu else "cpu"
    weight = torch.randn(vocab, hidden, dtype=torch.bfloat16, device=device)
    table = pin_table(weight)
    ids = torch.randint(0, vocab, (tokens,), device=device)
    moved = tokens * hidden * weight.element_size()

    def host_gather():
        rows = table[ids.cpu()]
        return rows.pin_memory().to(device, non_blocking=True) if on_gpu else rows

    providers = {
        "eager": lambda: torch.nn.functional.embedding(ids, weight),
        "compile": torch.compile(torch.nn.functional.embedding) if on_gpu else None,
        "host-gather": host_gather,
        "ours": lambda: host_embedding(ids, table),
    }
    expected = torch.nn.functional.embedding(ids, weight)
    link = _host_to_device_gbps(moved, on_gpu, args.smoke)
    rows = []
    for name, fn in providers.items():
        if fn is None:
            continue
        call = (lambda f=fn: f(ids, weight)) if name == "compile" else fn
        if not torch.equal(call(), expected):
            sys.exit(f"{name} returned other rows than the lookup on the GPU")
        graph = name not in ("host-gather",)  # a host wait cannot be captured
        ms, info = time_ms(call, on_gpu, args.smoke, graph=graph)
        row = {"op": "host_embedding", "provider": name, "vocab": vocab, "hidden": hidden, "tokens": tokens}
        row.update(ms=round(ms, 4), gbps=round(moved / ms / 1e6, 1), h2d_copy_gbps=link and round(link, 1), **info)
        on_device = name in ("eager", "compile")
        row["gpu_table_mib"] = round(weight.numel() * weight.element_size() / 2**20) if on_device else 0
        print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
    print(f"\nembedding lookup, {tokens} ids of a {vocab}x{hidden} bf16 table ({moved / 2**20:.0f} MiB of rows)")
    print(f"{'provider':<12} {'ms':>8} {'GB/s':>8} {'table on GPU':>13}")
    for row in rows:
        print(f"{row['provider']:<12} {row['ms']:>8.3f} {row['gbps']:>8.1f} {row['gpu_table_mib']:>10} MiB")
    if link:
        print(f"host-to-device copy of the same bytes: {link:.1f} GB/s")


if __name__ == "__main__":
    main()
