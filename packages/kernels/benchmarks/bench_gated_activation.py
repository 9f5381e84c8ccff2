"""Benchmark gated activations (SwiGLU, GeGLU exact and tanh), forward + backward, bf16, on a CUDA GPU.

Providers: PyTorch eager written as transformers' MLPs write it (``act_fn(gate) * up`` with ACT2FN's silu, gelu,
gelu_pytorch_tanh), torch.compile of that same function, Liger-Kernel (when installed: ``LigerSiLUMulFunction``;
``LigerGELUMulFunction``, which is the tanh form only) and swiftune_kernels. Prints one ``RESULT {json}`` line per
measurement and a table.

    uv run python packages/kernels/benchmarks/bench_gated_activation.py          # GPU, Llama-3.1-8B MLP at 8k tokens
    uv run python packages/kernels/benchmarks/bench_gated_activation.py --shapes 8192x14336,16384x8192
    uv run python packages/kernels/benchmarks/bench_gated_activation.py --smoke  # tiny, CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from _timing import copy_bandwidth_gbps, time_ms

EAGER = {
    "swiglu": lambda gate, up: F.silu(gate) * up,  # ACT2FN["silu"] = nn.SiLU
    "geglu": lambda gate, up: F.gelu(gate) * up,  # ACT2FN["gelu"] = GELUActivation (erf)
    "geglu_tanh": lambda gate, up: F.gelu(gate, approximate="tanh") * up,  # ACT2FN["gelu_pytorch_tanh"]
}


def _providers(op: str):
    """{provider: fn(gate, up)} for one op; Liger only when importable and when it computes the same function."""
    from swiftune_kernels.gated_activation import geglu, swiglu

    ours = {
        "swiglu": swiglu,
        "geglu": geglu,
        "geglu_tanh": lambda gate, up: geglu(gate, up, approximate="tanh"),
    }[op]
    providers = {"eager": EAGER[op], "compile": torch.compile(EAGER[op]), "liger": None, "ours": ours}
    try:
        # Liger's backward writes dgate and dup into the saved gate and up; the timing loop reuses those tensors
        # (their values drift, the amount of work does not).
        if op == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            providers["liger"] = LigerSiLUMulFunction.apply
        elif op == "geglu_tanh":
            from liger_kernel.ops.geglu import LigerGELUMulFunction

            providers["liger"] = LigerGELUMulFunction.apply
    except ImportError:
        pass
    return providers


def _relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def measure(op, provider, fn, rows, cols, device, on_gpu, smoke, copy_gbps):
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    gate = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen).requires_grad_()
    up = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen).requires_grad_()
    dh = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)

    # correctness on copies (Liger writes into its inputs), against the eager math in float64
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = EAGER[op](g64, u64)
    ref_grads = torch.autograd.grad(ref, (g64, u64), dh.double())
    gc, uc = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fn(gc, uc)
    err = _relerr(out, ref)
    grads = torch.autograd.grad(out, (gc, uc), dh.clone())
    err_grad = max(_relerr(grads[0], ref_grads[0]), _relerr(grads[1], ref_grads[1]))
    del g64, u64, ref, ref_grads, gc, uc, out, grads

    def step():
        torch.autograd.grad(fn(gate, up), (gate, up), dh)

    ms, timing = time_ms(step, on_gpu, smoke)
    extra_mb = None
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    # Bytes that must move at minimum: forward reads gate, up and writes h; backward reads dh, gate, up and
    # writes dgate, dup: 8 x rows x cols elements.
    gbps = 8 * rows * cols * gate.element_size() / ms / 1e6
    return {
        "op": op,
        "provider": provider,
        "shape": f"{rows}x{cols}",
        "dtype": "bfloat16",
        "ms": round(ms, 4),
        "gbps": round(gbps, 1),
        "pct_copy_bw": round(100 * gbps / copy_gbps, 1),
        "extra_peak_mib": None if extra_mb is None else round(extra_mb, 1),
        "relerr_out": float(f"{err:.3g}"),
        "relerr_grad": float(f"{err_grad:.3g}"),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (Triton interpreter)",
        **timing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8192x14336", help="comma-separated ROWSxINTERMEDIATE list")
    parser.add_argument("--ops", default="swiglu,geglu,geglu_tanh")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        if not args.smoke:
            sys.exit("bench_gated_activation.py needs a CUDA GPU; use --smoke for a CPU check under the interpreter.")
        # Triton picks interpret-or-compile when a kernel is decorated: set this before importing the kernels.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes = [(64, 300)] if args.smoke else [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]

    copy_gbps = copy_bandwidth_gbps(device, on_gpu, args.smoke)
    print("RESULT " + json.dumps({"copy_bandwidth_gbps": round(copy_gbps, 1)}), flush=True)
    results = []
    for op in args.ops.split(","):
        providers = _providers(op)
        for rows, cols in shapes:
            for provider, fn in providers.items():
                if fn is None or (provider == "compile" and args.smoke):
                    continue  # Inductor's CPU build takes minutes; the GPU run covers it
                try:
                    row = measure(op, provider, fn, rows, cols, device, on_gpu, args.smoke, copy_gbps)
                except Exception as error:  # one failing provider must not lose the others' numbers
                    row = {"op": op, "provider": provider, "shape": f"{rows}x{cols}", "error": repr(error)[:300]}
                print("RESULT " + json.dumps(row), flush=True)
                results.append(row)
        torch._dynamo.reset()

    print(f"\ncopy bandwidth: {copy_gbps:.0f} GB/s (bf16, fwd+bwd, % of copy bandwidth; extra peak MiB)")
    print(f"{'op':<11} {'shape':<12} {'provider':<8} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'MiB':>8} {'relerr':>9}")
    for r in results:
        head = f"{r['op']:<11} {r['shape']:<12} {r['provider']:<8}"
        if "error" in r:
            print(f"{head} error: {r['error'][:60]}")
            continue
        mib = "-" if r["extra_peak_mib"] is None else f"{r['extra_peak_mib']:.0f}"
        print(
            f"{head} {r['ms']:>9.4f} {r['gbps']:>8.0f} {r['pct_copy_bw']:>6.1f} {mib:>8} "
            f"{max(r['relerr_out'], r['relerr_grad']):>9.2g}"
        )


if __name__ == "__main__":
    main()
