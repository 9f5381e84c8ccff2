"""Benchmark NF4 dequantization (bitsandbytes' 4-bit format, with and without double quantization) on a CUDA GPU.

Providers: PyTorch eager (the pure-torch reference: unpack, gather, scale), torch.compile of that same function,
bitsandbytes' own ``dequantize_4bit`` (when installed; its CUDA kernel) and swiftune_kernels' Triton kernel.
Memory-bound: reported as GB/s and as % of the device's copy bandwidth measured in the same run (target: 70%).
Prints one ``RESULT {json}`` line per measurement and a table.

    uv run python packages/kernels/benchmarks/bench_nf4.py                  # GPU, 4096x14336 (Llama-3.1-8B MLP)
    uv run python packages/kernels/benchmarks/bench_nf4.py --shapes 4096x14336,4096x4096
    uv run python packages/kernels/benchmarks/bench_nf4.py --smoke          # tiny, CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from _timing import copy_bandwidth_gbps, time_ms


def _quantize(weight: torch.Tensor, nested: bool):
    """(packed, quant_state) from bitsandbytes when importable, else from the reference quantizer (same layout)."""
    try:
        import bitsandbytes.functional as bnb_f

        return bnb_f.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, blocksize=64), "bitsandbytes"
    except ImportError:
        from swiftune_kernels.reference.nf4 import quantize_nf4

        return quantize_nf4(weight, 64, compress_statistics=nested), "reference quantizer"


def _providers(on_gpu: bool):
    from swiftune_kernels.nf4 import dequantize_nf4
    from swiftune_kernels.reference.nf4 import dequantize_nf4 as eager

    providers = {"eager": eager, "compile": torch.compile(eager) if on_gpu else None, "bitsandbytes": None}
    try:
        import bitsandbytes.functional as bnb_f

        providers["bitsandbytes"] = lambda packed, state: bnb_f.dequantize_4bit(packed, state)
    except ImportError:
        pass
    providers["ours"] = dequantize_nf4
    return providers


def measure(provider, fn, packed, state, shape, nested, device, on_gpu, smoke, copy_gbps, source):
    out = fn(packed, state)  # also the correctness check of the row
    reference = _providers(False)["eager"](packed, state)
    exact = bool(torch.equal(out, reference))
    ms, timing = time_ms(lambda: fn(packed, state), on_gpu, smoke)
    extra_mb = None
    if on_gpu:
        del out
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn(packed, state)
        torch.cuda.synchronize()
        extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    numel = math.prod(shape)
    # Bytes that must move at minimum: the packed indices (n / 2), one scale per 64-block (uint8 when double
    # quantized, float32 otherwise), and the bf16 output (2 n); the code tables and second-level scales are noise.
    moved = numel / 2 + (numel // 64) * (1 if nested else 4) + 2 * numel
    gbps = moved / ms / 1e6
    return {
        "op": "nf4_dequant" + ("_nested" if nested else ""),
        "provider": provider,
        "shape": "x".join(map(str, shape)),
        "dtype": "bfloat16",
        "ms": round(ms, 4),
        "gbps": round(gbps, 1),
        "pct_copy_bw": round(100 * gbps / copy_gbps, 1),
        "extra_peak_mib": None if extra_mb is None else round(extra_mb, 1),
        "bit_exact_vs_reference": exact,
        "quantized_by": source,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (Triton interpreter)",
        **timing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x14336", help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        if not args.smoke:
            sys.exit("bench_nf4.py needs a CUDA GPU; use --smoke for a CPU check under Triton's interpreter.")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes = [(64, 256)] if args.smoke else [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]

    copy_gbps = copy_bandwidth_gbps(device, on_gpu, args.smoke)
    print("RESULT " + json.dumps({"copy_bandwidth_gbps": round(copy_gbps, 1)}), flush=True)
    providers = _providers(on_gpu)
    results = []
    for shape in shapes:
        weight = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(0))
        weight = weight.to(torch.bfloat16)
        for nested in (False, True):
            (packed, state), source = _quantize(weight, nested)
            for provider, fn in providers.items():
                if fn is None:
                    continue
                try:
                    row = measure(
                        provider, fn, packed, state, shape, nested, device, on_gpu, args.smoke, copy_gbps, source
                    )
                except Exception as error:  # one failing provider must not lose the others' numbers
                    row = {"op": "nf4_dequant", "provider": provider, "shape": "x".join(map(str, shape)),
                           "error": repr(error)[:300]}  # fmt: skip
                print("RESULT " + json.dumps(row), flush=True)
                results.append(row)
        torch._dynamo.reset()

    print(f"\ncopy bandwidth: {copy_gbps:.1f} GB/s (bf16 output; GB/s of the minimum bytes; extra peak MiB)")
    print(f"{'op':<19} {'shape':<12} {'provider':<13} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'MiB':>7} exact")
    for r in results:
        if "error" in r:
            print(f"{r['op']:<19} {r['shape']:<12} {r['provider']:<13} error: {r['error'][:60]}")
            continue
        mib = "-" if r["extra_peak_mib"] is None else f"{r['extra_peak_mib']:.0f}"
        print(
            f"{r['op']:<19} {r['shape']:<12} {r['provider']:<13} {r['ms']:>9.4f} {r['gbps']:>8.0f} "
            f"{r['pct_copy_bw']:>6.1f} {mib:>7} {r['bit_exact_vs_reference']}"
        )


if __name__ == "__main__":
    main()
