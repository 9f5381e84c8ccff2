"""Benchmark lm_head + cross-entropy (hidden states to loss), forward + backward, on a CUDA GPU.

Providers: PyTorch eager written as transformers writes it (lm_head, logits.float(), F.cross_entropy),
torch.compile of that same function, Liger-Kernel's fused linear cross-entropy (when installed) and
swiftune_kernels.fused_linear_cross_entropy (also as "ours-row-kernel": its chunks' cross-entropy held to the row
kernel, where long rows otherwise take the cluster kernel on sm_90+); each with a frozen lm_head (LoRA: only
grad_hidden) and a trainable one (grad_hidden and grad_weight). A sweep of ours' chunk size follows unless
--no-sweep. Prints one ``RESULT {json}``
line per measurement and a table.

    uv run python packages/kernels/benchmarks/bench_fused_linear_cross_entropy.py              # 8192x4096x128256
    uv run python packages/kernels/benchmarks/bench_fused_linear_cross_entropy.py --shapes 8192x3584x151936
    uv run python packages/kernels/benchmarks/bench_fused_linear_cross_entropy.py --smoke      # tiny, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from _timing import copy_bandwidth_gbps, time_ms, with_row_kernel


def hf_linear_cross_entropy(hidden, weight, targets):
    # transformers: logits = self.lm_head(hidden_states); ForCausalLMLoss upcasts them and calls F.cross_entropy.
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="mean")


def _providers():
    from swiftune_kernels import fused_linear_cross_entropy

    providers = {
        "eager": hf_linear_cross_entropy,
        "compile": torch.compile(hf_linear_cross_entropy),
        "liger": None,
        "ours": fused_linear_cross_entropy,
        "ours-row-kernel": with_row_kernel(fused_linear_cross_entropy),
    }
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        providers["liger"] = lambda h, w, t: liger(w, h, t)
    except ImportError:
        pass
    return providers


def measure(provider, fn, shape, dtype, trainable, device, on_gpu, smoke):
    tokens, hidden_size, vocab = shape
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, generator=gen) * hidden_size**-0.5).to(dtype)
    weight.requires_grad_(trainable)
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    targets[::20] = -100
    wrt = [hidden, weight] if trainable else [hidden]

    def step():
        torch.autograd.grad(fn(hidden, weight, targets), wrt)

    ms, timing = time_ms(step, on_gpu, smoke)
    extra_mb = workspace_mb = None
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        # The gradients returned must exist whatever the method; the rest is the method's workspace.
        workspace_mb = extra_mb - sum(t.numel() * t.element_size() for t in wrt) / 2**20
    # Useful FLOPs: logits = h W^T, grad_hidden = dlogits W, and grad_weight = dlogits^T h when trainable.
    tflops = 2 * tokens * hidden_size * vocab * (3 if trainable else 2) / ms / 1e9
    return {
        "op": "fused_linear_cross_entropy",
        "weight": "trainable" if trainable else "frozen",
        "provider": provider,
        "shape": "x".join(map(str, shape)),
        "dtype": str(dtype).removeprefix("torch."),
        "ms": round(ms, 3),
        "tflops": round(tflops, 1),
        "extra_peak_mib": None if extra_mb is None else round(extra_mb, 1),
        "workspace_mib": None if workspace_mb is None else round(workspace_mb, 1),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (Triton interpreter)",
        **timing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8192x4096x128256", help="comma-separated TOKENSxHIDDENxVOCAB list")
    parser.add_argument("--no-sweep", action="store_true", help="skip the chunk size sweep of ours")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        if not args.smoke:
            sys.exit("this benchmark needs a CUDA GPU; use --smoke for a CPU check under Triton's interpreter.")
        # Triton picks interpret-or-compile when a kernel is decorated: set this before importing the kernels.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if on_gpu else "cpu")
    if args.smoke:
        shapes = [(24, 32, 300)]
    else:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    dtype = torch.bfloat16

    copy_gbps = copy_bandwidth_gbps(device, on_gpu, args.smoke)
    print("RESULT " + json.dumps({"copy_bandwidth_gbps": round(copy_gbps, 1)}), flush=True)
    providers = _providers()
    if not args.no_sweep:
        from swiftune_kernels import fused_linear_cross_entropy

        for chunk in (8,) if args.smoke else (512, 1024, 2048):
            providers[f"ours[chunk={chunk}]"] = lambda h, w, t, c=chunk: fused_linear_cross_entropy(
                h, w, t, chunk_size=c
            )
    results = []
    for shape in shapes:
        for trainable in (False, True):
            for provider, fn in providers.items():
                if fn is None or (provider == "compile" and args.smoke):
                    continue  # Liger absent; Inductor's CPU build takes minutes, the GPU run covers it
                try:
                    row = measure(provider, fn, shape, dtype, trainable, device, on_gpu, args.smoke)
                except Exception as error:  # one failing provider must not lose the others' numbers
                    row = {
                        "op": "fused_linear_cross_entropy",
                        "weight": "trainable" if trainable else "frozen",
                        "provider": provider,
                        "shape": "x".join(map(str, shape)),
                        "error": repr(error),
                    }
                print("RESULT " + json.dumps(row), flush=True)
                results.append(row)
                if on_gpu:
                    torch.cuda.empty_cache()
            torch._dynamo.reset()

    print(f"\ncopy bandwidth: {copy_gbps:.0f} GB/s (bf16 fwd+bwd; extra peak and workspace = extra minus grads, MiB)")
    print(f"{'shape':<18} {'weight':<10} {'provider':<18} {'ms':>9} {'TFLOP/s':>8} {'MiB':>8} {'wksp':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['shape']:<18} {r['weight']:<10} {r['provider']:<18} error: {r['error'][:60]}")
            continue
        mib = "-" if r["extra_peak_mib"] is None else f"{r['extra_peak_mib']:.0f}"
        wksp = "-" if r["workspace_mib"] is None else f"{r['workspace_mib']:.0f}"
        print(
            f"{r['shape']:<18} {r['weight']:<10} {r['provider']:<18} {r['ms']:>9.3f} {r['tflops']:>8.1f} "
            f"{mib:>8} {wksp:>8}"
        )


if __name__ == "__main__":
    main()
