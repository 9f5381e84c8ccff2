"""Benchmark cross-entropy over a large vocabulary, forward + backward, on a CUDA GPU.

Providers: PyTorch eager written as transformers writes it (logits.float() then F.cross_entropy), torch.compile of
that same function, Liger-Kernel (when installed; it writes the gradient into the logits), and swiftune_kernels
with inplace=True (gradient written into the logits buffer), inplace=False, and inplace=True held to the row kernel
("ours-row-kernel": long rows otherwise take the cluster kernel on sm_90+). Ours' row kernel at a few launch
configurations (the forward kernel alone, which is the whole fwd+bwd work) follows unless --no-sweep;
sweep_kernels.py sweeps many more.
Prints one ``RESULT {json}`` line per measurement and a table.

    uv run python packages/kernels/benchmarks/bench_cross_entropy.py                  # GPU, 8192x128256 bf16
    uv run python packages/kernels/benchmarks/bench_cross_entropy.py --shapes 8192x128256,4096x256000 --softcap 30
    uv run python packages/kernels/benchmarks/bench_cross_entropy.py --smoke          # tiny, CPU, interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from _timing import copy_bandwidth_gbps, time_ms, with_row_kernel


def hf_cross_entropy(logits, targets, softcap=None):
    # transformers' ForCausalLMLoss: upcast the logits to float32, then nn.functional.cross_entropy;
    # Gemma 2 soft-caps the logits in the model before that.
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="mean")


def _providers(softcap):
    from swiftune_kernels import cross_entropy

    providers = {
        "eager": lambda x, t: hf_cross_entropy(x, t, softcap),
        "compile": torch.compile(lambda x, t: hf_cross_entropy(x, t, softcap)),
        "liger": None,
        "ours": lambda x, t: cross_entropy(x, t, softcap=softcap, inplace=True),
        "ours-noinplace": lambda x, t: cross_entropy(x, t, softcap=softcap),
        "ours-row-kernel": with_row_kernel(lambda x, t: cross_entropy(x, t, softcap=softcap, inplace=True)),
    }
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        providers["liger"] = LigerCrossEntropyLoss(ignore_index=-100, reduction="mean", softcap=softcap)
    except ImportError:
        pass
    return providers


def make_inputs(rows, vocab, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=device, generator=gen) * 2).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    targets[::20] = -100  # a few ignored tokens (prompt / padding), as in fine-tuning
    return logits, targets


def min_bytes(rows, vocab, itemsize=2):
    """Bytes cross-entropy must move at minimum: read the logits once and write their gradient once (2 x N x V
    elements); targets and the loss are negligible. That is exactly what a copy of the logits moves."""
    return 2 * rows * vocab * itemsize


def pct_of_copy(rows, vocab, ms, copy_gbps, itemsize=2):
    """% of the copy bandwidth that :func:`min_bytes` moved in ``ms`` milliseconds stands for."""
    return 100 * min_bytes(rows, vocab, itemsize) / ms / 1e6 / copy_gbps


def _row(provider, rows, vocab, dtype, ms, copy_gbps, extra_mb, on_gpu, **more):
    gbps = min_bytes(rows, vocab, dtype.itemsize) / ms / 1e6
    return {
        "op": "cross_entropy",
        "provider": provider,
        "shape": f"{rows}x{vocab}",
        "dtype": str(dtype).removeprefix("torch."),
        "ms": round(ms, 4),
        "gbps": round(gbps, 1),
        "pct_copy_bw": round(100 * gbps / copy_gbps, 1),
        "extra_peak_mib": None if extra_mb is None else round(extra_mb, 1),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)",
        **more,
    }


def _extra_peak_mib(step, on_gpu):
    if not on_gpu:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(provider, fn, rows, vocab, dtype, device, on_gpu, smoke, copy_gbps, softcap):
    base, targets = make_inputs(rows, vocab, dtype, device)
    base.requires_grad_()

    def step():
        # A view makes the logits a non-leaf, as lm_head's output is (in-place providers refuse or corrupt leaves);
        # autograd.grad rather than .backward(): no accumulation into .grad to time as well. The in-place providers
        # leave gradients in the buffer, which the next call reads as logits: the work does not depend on values.
        torch.autograd.grad(fn(base.view_as(base), targets), [base])

    ms, timing = time_ms(step, on_gpu, smoke)
    # Extra peak includes the (N, V) gradient that eager and inplace=False return; in-place providers return the
    # logits buffer itself.
    return _row(
        provider, rows, vocab, dtype, ms, copy_gbps, _extra_peak_mib(step, on_gpu), on_gpu, softcap=softcap, **timing
    )


def sweep(rows, vocab, dtype, device, on_gpu, smoke, copy_gbps, softcap):
    """Ours' forward kernel alone (loss + in-place gradient: all of fwd+bwd's traffic) per launch configuration."""
    from swiftune_kernels.cross_entropy import cross_entropy_forward

    logits, targets = make_inputs(rows, vocab, dtype, device)
    weight = torch.ones(1, device=device)
    # (block_v, warps, lane columns); None: the launcher's defaults (sweep_kernels.py sweeps more), i.e. 32768
    # columns of bf16, 32 warps, one lane a block; 256: one warp's bf16 loads a lane.
    configs = [(128, 4, None), (64, 2, 16)] if smoke else [(32768, 32, 256), (None, None, None)]
    out = []
    for block_v, num_warps, lane_cols in configs:
        ms, timing = time_ms(
            lambda bv=block_v, nw=num_warps, lc=lane_cols: cross_entropy_forward(
                logits, targets, weight, softcap=softcap, grad=logits, block_v=bv, num_warps=nw, lane_cols=lc
            ),
            on_gpu,
            smoke,
        )
        name = "ours-kernel[default]"
        if block_v is not None:
            name = f"ours-kernel[bv={block_v},w={num_warps}" + (f",lanes={lane_cols}]" if lane_cols else "]")
        out.append(_row(name, rows, vocab, dtype, ms, copy_gbps, None, on_gpu, softcap=softcap, **timing))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8192x128256", help="comma-separated TOKENSxVOCAB list")
    parser.add_argument("--softcap", type=float, default=None, help="Gemma 2 logit soft-capping (e.g. 30)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the block size / warps sweep of ours")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        if not args.smoke:
            sys.exit("bench_cross_entropy.py needs a CUDA GPU; use --smoke for a CPU check under the interpreter.")
        # Triton picks interpret-or-compile when a kernel is decorated: set this before importing the kernels.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes = [(8, 300)] if args.smoke else [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    dtype = torch.bfloat16

    copy_gbps = copy_bandwidth_gbps(device, on_gpu, args.smoke)
    print("RESULT " + json.dumps({"copy_bandwidth_gbps": round(copy_gbps, 1)}), flush=True)
    results = []
    providers = _providers(args.softcap)
    for rows, vocab in shapes:
        for provider, fn in providers.items():
            if fn is None or (provider == "compile" and args.smoke):
                continue  # Liger absent; Inductor's CPU build takes minutes, the GPU run covers it
            try:
                row = measure(provider, fn, rows, vocab, dtype, device, on_gpu, args.smoke, copy_gbps, args.softcap)
            except Exception as error:  # one failing provider must not lose the others' numbers
                row = {"op": "cross_entropy", "provider": provider, "shape": f"{rows}x{vocab}", "error": repr(error)}
            print("RESULT " + json.dumps(row), flush=True)
            results.append(row)
            if on_gpu:
                torch.cuda.empty_cache()
        if not args.no_sweep:
            for row in sweep(rows, vocab, dtype, device, on_gpu, args.smoke, copy_gbps, args.softcap):
                print("RESULT " + json.dumps(row), flush=True)
                results.append(row)

    print(f"\ncopy bandwidth: {copy_gbps:.0f} GB/s (bf16 fwd+bwd; % of copy bandwidth; extra peak MiB)")
    print(f"{'shape':<14} {'provider':<28} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'MiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['shape']:<14} {r['provider']:<28} error: {r['error'][:70]}")
            continue
        mib = "-" if r["extra_peak_mib"] is None else f"{r['extra_peak_mib']:.0f}"
        print(
            f"{r['shape']:<14} {r['provider']:<28} {r['ms']:>9.4f} {r['gbps']:>8.0f} {r['pct_copy_bw']:>6.1f} {mib:>8}"
        )


if __name__ == "__main__":
    main()
