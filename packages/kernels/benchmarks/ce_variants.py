"""The cross-entropy kernel alone (fwd+bwd's whole traffic, in place) under launch options, interleaved repeats.

Each variant is a JSON dict of keyword options of ``cross_entropy_forward`` (``{}``: the default); the table gives
the best of the repeats as % of the copy bandwidth (2 x N x V bytes moved), and each new compilation's registers and
spills. With ``--once`` every variant runs twice per shape without timing, for a profiler to read its traffic:

    python packages/kernels/benchmarks/ce_variants.py '{}' '{"lane_cols": 8}' '{"programs": 99}'
    ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum -k regex:_cross_entropy_fwd \
        python packages/kernels/benchmarks/ce_variants.py --once --shapes 8192x256000 '{}'
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import sys

import torch
from _timing import copy_bandwidth_gbps, time_ms
from bench_cross_entropy import make_inputs, pct_of_copy

ce = importlib.import_module("swiftune_kernels.cross_entropy")


def compiled_kernels():
    """Triton's compiled variants of the row kernel so far (to print registers and spills of a new one)."""
    jit = ce._cross_entropy_fwd_kernel
    found = []
    for caches in getattr(jit, "device_caches", {}).values():
        found += list(caches[0].values())
    return found


def set_persisting_l2(nbytes: int) -> int:
    """cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE): the L2 set aside for persisting (evict_last) lines."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    torch.cuda.synchronize()
    status = libcuda.cuCtxSetLimit(ctypes.c_int(0x06), ctypes.c_size_t(nbytes))
    value = ctypes.c_size_t(0)
    libcuda.cuCtxGetLimit(ctypes.byref(value), ctypes.c_int(0x06))
    if status != 0:
        sys.exit(f"cuCtxSetLimit(persisting L2, {nbytes}) failed with CUDA error {status}")
    return value.value


def time_shape(rows, vocab, variants, args, copy):
    """Rows of the table for one (rows, vocab) shape: each variant timed ``args.repeats`` times, interleaved."""
    device = torch.device("cuda")
    logits, targets = make_inputs(rows, vocab, torch.bfloat16, device)
    weight = torch.ones(1, device=device)
    loss = torch.empty(rows, device=device)
    times = {}
    for _ in range(1 if args.once else args.repeats):
        for index, options in enumerate(variants):

            def fn(o=options):
                ce.cross_entropy_forward(logits, targets, weight, grad=logits, loss=loss, **o)

            before = {id(k) for k in compiled_kernels()}
            fn()
            for kernel in compiled_kernels():
                if id(kernel) not in before:
                    print(
                        f"compiled {json.dumps(options)}: {kernel.n_regs} registers, {kernel.n_spills} spills",
                        flush=True,
                    )
            if args.once:
                print(f"once {rows}x{vocab} {json.dumps(options)}", flush=True)
                fn()
                torch.cuda.synchronize()
                continue
            times.setdefault(index, []).append(time_ms(fn, True, False)[0])
    table = []
    for index, measured in times.items():
        pct = pct_of_copy(rows, vocab, min(measured), copy)
        row = dict(shape=f"{rows}x{vocab}", options=variants[index], ms=[round(t, 4) for t in measured],
                   pct_copy=round(pct, 1))  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)
        table.append(row)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="JSON dicts of cross_entropy_forward options")
    parser.add_argument("--shapes", default="8192x128256,8192x256000")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--once", action="store_true")
    parser.add_argument(
        "--persisting-l2-mib",
        type=float,
        default=0.0,
        help="set aside this much L2 for persisting (evict_last) lines first (the driver rounds it)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ce_variants.py needs a CUDA GPU.")
    variants = [json.loads(v) for v in args.variants]
    copy = None if args.once else copy_bandwidth_gbps(torch.device("cuda"), True, False)
    if args.persisting_l2_mib:
        # after the copy ceiling: the set-aside slows a plain copy as well
        got = set_persisting_l2(int(args.persisting_l2_mib * 2**20))
        print(f"persisting L2 set aside: {got / 2**20:.1f} MiB", flush=True)
        if not args.once:
            print(f"copy bandwidth with it: {copy_bandwidth_gbps(torch.device('cuda'), True, False):.0f} GB/s")
    table = []
    for shape in args.shapes.split(","):
        rows, vocab = (int(n) for n in shape.split("x"))
        table += time_shape(rows, vocab, variants, args, copy)
        torch.cuda.empty_cache()
    if args.persisting_l2_mib:
        set_persisting_l2(0)
    if table:
        print(f"\ncopy bandwidth {copy:.0f} GB/s")
        for r in table:
            print(f"{r['shape']:<12} {json.dumps(r['options']):<46} {str(r['ms']):<20} {r['pct_copy']:.1f}%")


if __name__ == "__main__":
    main()
