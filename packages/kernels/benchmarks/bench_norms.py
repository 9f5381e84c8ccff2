"""Benchmark RMSNorm (Llama and Gemma casting) and LayerNorm, forward + backward, on a CUDA GPU.

Providers: PyTorch eager written as transformers writes it, torch.compile of that same function,
Liger-Kernel (when installed) and swiftune_kernels. Each op runs with a frozen weight (LoRA: only dx) and a
trainable one (dx and the parameter gradients). Prints one ``RESULT {json}`` line per measurement and a table.

    uv run python packages/kernels/benchmarks/bench_norms.py                # GPU, 16384x4096 bf16
    uv run python packages/kernels/benchmarks/bench_norms.py --shapes 16384x4096,524288x128
    uv run python packages/kernels/benchmarks/bench_norms.py --smoke        # tiny, CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from _timing import copy_bandwidth_gbps, time_ms

EPS_RMS = 1e-6
EPS_LN = 1e-5


def llama_rms_norm_eager(x, weight):
    # transformers' LlamaRMSNorm.forward
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + EPS_RMS)
    return weight * hidden_states.to(input_dtype)


def gemma_rms_norm_eager(x, weight):
    # transformers' GemmaRMSNorm.forward
    output = x.float()
    output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + EPS_RMS)
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def layer_norm_eager(x, weight, bias):
    # torch.nn.LayerNorm.forward, which transformers uses as is
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS_LN)


def _providers(op: str):
    """{provider: fn(x, *params)} for one op; Liger only when importable."""
    from swiftune_kernels import layer_norm, rms_norm

    eager = {"rms_llama": llama_rms_norm_eager, "rms_gemma": gemma_rms_norm_eager, "layer_norm": layer_norm_eager}[op]
    ours = {
        "rms_llama": lambda x, w: rms_norm(x, w, EPS_RMS, 0.0, "llama"),
        "rms_gemma": lambda x, w: rms_norm(x, w, EPS_RMS, 1.0, "gemma"),
        "layer_norm": lambda x, w, b: layer_norm(x, w, b, EPS_LN),
    }[op]
    providers = {"eager": eager, "compile": torch.compile(eager), "liger": None, "ours": ours}
    try:
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

        # in_place=False: Liger would otherwise write dx over dy, which the timing loop reuses.
        providers["liger"] = {
            "rms_llama": lambda x, w: liger_rms_norm(x, w, EPS_RMS, 0.0, "llama", False),
            "rms_gemma": lambda x, w: liger_rms_norm(x, w, EPS_RMS, 1.0, "gemma", False),
            "layer_norm": lambda x, w, b: liger_layer_norm(x, w, b, EPS_LN),
        }[op]
    except ImportError:
        pass
    return providers


def measure(op, provider, fn, rows, hidden, dtype, trainable, device, on_gpu, smoke, copy_gbps):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
    weight = (1.0 + 0.1 * torch.randn(hidden, device=device, generator=gen)).to(dtype)
    params = [weight] if op != "layer_norm" else [weight, torch.zeros(hidden, device=device, dtype=dtype)]
    for param in params:
        param.requires_grad_(trainable)
    wrt = [x] + (params if trainable else [])

    def step():
        # autograd.grad rather than .backward(): no accumulation into .grad to time as well.
        torch.autograd.grad(fn(x, *params), wrt, dy)

    ms, timing = time_ms(step, on_gpu, smoke)
    extra_mb = None
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    # Bytes that must move at minimum: forward reads x and writes y, backward reads x and dy and writes dx
    # (5 x rows x hidden elements); the (hidden,) parameters and their gradients are negligible.
    gbps = 5 * rows * hidden * x.element_size() / ms / 1e6
    return {
        "op": op,
        "weight": "trainable" if trainable else "frozen",
        "provider": provider,
        "shape": f"{rows}x{hidden}",
        "dtype": str(dtype).removeprefix("torch."),
        "ms": round(ms, 4),
        "gbps": round(gbps, 1),
        "pct_copy_bw": round(100 * gbps / copy_gbps, 1),
        "extra_peak_mib": None if extra_mb is None else round(extra_mb, 1),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (Triton interpreter)",
        **timing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="16384x4096", help="comma-separated ROWSxHIDDEN list")
    parser.add_argument("--ops", default="rms_llama,rms_gemma,layer_norm")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        if not args.smoke:
            sys.exit("bench_norms.py needs a CUDA GPU; use --smoke for a CPU check under Triton's interpreter.")
        # Triton picks interpret-or-compile when a kernel is decorated: set this before importing the kernels.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes = [(64, 256)] if args.smoke else [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    dtype = torch.bfloat16

    copy_gbps = copy_bandwidth_gbps(device, on_gpu, args.smoke)
    print("RESULT " + json.dumps({"copy_bandwidth_gbps": round(copy_gbps, 1)}), flush=True)
    results = []
    for op in args.ops.split(","):
        providers = _providers(op)
        for rows, hidden in shapes:
            for trainable in (False, True):
                for provider, fn in providers.items():
                    if fn is None:
                        continue
                    if provider == "compile" and args.smoke:
                        continue  # Inductor's CPU build takes minutes; the GPU run covers it
                    try:
                        row = measure(
                            op, provider, fn, rows, hidden, dtype, trainable, device, on_gpu, args.smoke, copy_gbps
                        )
                    except Exception as error:  # one failing provider must not lose the others' numbers
                        row = {
                            "op": op,
                            "provider": provider,
                            "shape": f"{rows}x{hidden}",
                            "weight": "trainable" if trainable else "frozen",
                            "error": repr(error)[:300],
                        }
                    print("RESULT " + json.dumps(row), flush=True)
                    results.append(row)
                torch._dynamo.reset()

    print(f"\ncopy bandwidth: {copy_gbps:.1f} GB/s (bf16, fwd+bwd, % of copy bandwidth; extra peak MiB)")
    print(f"{'op':<11} {'shape':<12} {'weight':<10} {'provider':<8} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'MiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['op']:<11} {r['shape']:<12} {r['weight']:<10} {r['provider']:<8} error: {r['error'][:60]}")
            continue
        mib = "-" if r["extra_peak_mib"] is None else f"{r['extra_peak_mib']:.0f}"
        print(
            f"{r['op']:<11} {r['shape']:<12} {r['weight']:<10} {r['provider']:<8} {r['ms']:>9.4f} "
            f"{r['gbps']:>8.0f} {r['pct_copy_bw']:>6.1f} {mib:>8}"
        )


if __name__ == "__main__":
    main()
