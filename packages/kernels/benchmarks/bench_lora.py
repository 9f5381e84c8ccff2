"""Benchmark the fused LoRA MLP and QKV (forward + backward) against peft's LoRA layers, on a CUDA GPU.

Llama-3.1-8B layer sizes (hidden 4096, intermediate 14336, 32 q heads and 8 kv heads of 128), 8192 tokens, r=16,
bf16 activations, adapters in float32 as peft keeps them. Base weights frozen, either bf16 (``nn.Linear``) or NF4
(bitsandbytes ``Linear4bit``, double-quantized, when bitsandbytes is installed). Providers: peft's LoRA layers
(eager), torch.compile of the same peft module, and swiftune_kernels' ``lora_mlp`` / ``lora_qkv`` on the same
weights. Gradients are taken for x and every adapter. Reports ms, TFLOP/s of the base matmuls (forward
2*T*sum(out*in) plus the backward dx pass, same again; the rank-16 adapter matmuls are ~0.5% more) and extra
peak memory over the inputs. Prints one ``RESULT {json}`` line per measurement and a table.

    uv run python packages/kernels/benchmarks/bench_lora.py                 # GPU
    uv run python packages/kernels/benchmarks/bench_lora.py --tokens 4096 --rank 64
    uv run python packages/kernels/benchmarks/bench_lora.py --smoke         # tiny, CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from _timing import time_ms
from torch import nn


class LlamaMLP(nn.Module):
    """transformers' LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), no bias."""

    def __init__(self, hidden, intermediate, linear):
        super().__init__()
        self.gate_proj, self.up_proj = linear(hidden, intermediate), linear(hidden, intermediate)
        self.down_proj = linear(intermediate, hidden)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaQKV(nn.Module):
    """The q, k, v projections of transformers' LlamaAttention (the attention itself is not timed)."""

    def __init__(self, hidden, kv, linear):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = linear(hidden, hidden), linear(hidden, kv), linear(hidden, kv)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _linear_factory(base: str, device):
    if base == "bf16":
        return lambda i, o: nn.Linear(i, o, bias=False, device=device, dtype=torch.bfloat16)
    import bitsandbytes as bnb

    def make(i, o):
        weight = (torch.randn(o, i, device=device) / i**0.5).to(torch.bfloat16)
        layer = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        return layer.to(device)  # quantizes on the way

    return make


def _build(kind, base, dims, rank, device):
    """(peft model, {name: peft LoRA layer}) with random B (peft starts it at zero)."""
    import peft

    linear = _linear_factory(base, device)
    hidden, intermediate, kv = dims
    module = LlamaMLP(hidden, intermediate, linear) if kind == "mlp" else LlamaQKV(hidden, kv, linear)
    for p in module.parameters():
        p.requires_grad_(False)
    names = ["gate_proj", "up_proj", "down_proj"] if kind == "mlp" else ["q_proj", "k_proj", "v_proj"]
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names, lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(module, config)
    layers = {n: getattr(model.base_model.model, n) for n in names}
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_(0, 0.02)
    return model, layers


def _ours(kind, layers):
    from swiftune_kernels import lora_mlp, lora_qkv

    args = []
    for layer in layers.values():
        args += [layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        args.append(layer.scaling["default"])
    if kind == "mlp":
        return lambda x: lora_mlp(x, *args, "silu")
    return lambda x: lora_qkv(x, *args)


def _base_flops(kind, dims, tokens):
    hidden, intermediate, kv = dims
    shapes = [(intermediate, hidden)] * 3 if kind == "mlp" else [(hidden, hidden), (kv, hidden), (kv, hidden)]
    return 4 * tokens * sum(o * i for o, i in shapes)  # forward + backward dx, 2 flops a multiply-add


def max_rel_err(peft_fn, ours_fn, layers, dims, tokens, device):
    """Largest normwise relative difference ||ours - peft|| / ||peft|| over the outputs and all gradients."""
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, tokens, dims[0], device=device, generator=gen).to(torch.bfloat16).requires_grad_()
    adapters = [
        t for layer in layers.values() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    ]
    results = []
    for fn in (peft_fn, ours_fn):
        outs = fn(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        dys = [
            torch.randn(o.shape, device=device, generator=torch.Generator(device=device).manual_seed(2)) for o in outs
        ]
        grads = torch.autograd.grad(outs, [x, *adapters], [d.to(o.dtype) for d, o in zip(dys, outs, strict=True)])
        results.append([o.detach().float() for o in outs] + [g.float() for g in grads])
    return round(max(((a - b).norm() / b.norm()).item() for a, b in zip(results[1], results[0], strict=True)), 5)


def measure(kind, base, provider, fn, layers, dims, tokens, device, on_gpu, smoke):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, tokens, dims[0], device=device, generator=gen).to(torch.bfloat16).requires_grad_()
    adapters = [
        t for layer in layers.values() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    ]
    with torch.no_grad():
        outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    dys = [torch.randn_like(o) for o in outs]
    del outs

    def step():
        outs = fn(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, [x, *adapters], dys)

    ms, timing = time_ms(step, on_gpu, smoke, graph=False)  # ~ms steps: host launch overhead is noise
    extra_mb = None
    if on_gpu:
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra_mb = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    return {
        "op": f"lora_{kind}",
        "weight": base,
        "provider": provider,
        "shape": f"{tokens}x{dims[0]}x{dims[1] if kind == 'mlp' else dims[2]}",
        "dtype": "bfloat16",
        "ms": round(ms, 4),
        "tflops": round(_base_flops(kind, dims, tokens) / ms / 1e9, 1),
        "extra_peak_mib": None if extra_mb is None else round(extra_mb, 1),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (Triton interpreter)",
        **timing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ops", default="mlp,qkv")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        if not args.smoke:
            sys.exit("bench_lora.py needs a CUDA GPU; use --smoke for a CPU check under Triton's interpreter.")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    device = torch.device("cuda" if on_gpu else "cpu")
    dims = (64, 160, 32) if args.smoke else (4096, 14336, 1024)  # hidden, intermediate, kv out
    tokens, rank = (16, 4) if args.smoke else (args.tokens, args.rank)
    bases = ["bf16"]
    try:
        import bitsandbytes  # noqa: F401

        bases.append("nf4")
    except ImportError:
        pass

    results = []
    for kind in args.ops.split(","):
        for base in bases:
            try:
                model, layers = _build(kind, base, dims, rank, device)
            except Exception as error:
                row = {"op": f"lora_{kind}", "weight": base, "provider": "setup", "error": repr(error)[:300]}
                print("RESULT " + json.dumps(row), flush=True)
                results.append(row)
                continue
            # compile only over bf16 bases: bitsandbytes' 4-bit matmul breaks the graph anyway, and compile time
            # counts against run_all's per-benchmark limit
            compiled = None if args.smoke or base != "bf16" else torch.compile(model)
            # compile last: if it runs past run_all's time limit, the eager and fused rows are already printed
            providers = {"peft": model, "ours": _ours(kind, layers), "peft_compile": compiled}
            try:
                agreement = max_rel_err(model, providers["ours"], layers, dims, tokens, device)
            except Exception as error:
                agreement = repr(error)[:200]
            for provider, fn in providers.items():
                if fn is None:
                    continue
                try:
                    row = measure(kind, base, provider, fn, layers, dims, tokens, device, on_gpu, args.smoke)
                    if provider == "ours":
                        row["max_rel_err_vs_peft"] = agreement
                except Exception as error:  # one failing provider must not lose the others' numbers
                    row = {"op": f"lora_{kind}", "weight": base, "provider": provider, "error": repr(error)[:300]}
                print("RESULT " + json.dumps(row), flush=True)
                results.append(row)
            del model, layers, providers
            torch._dynamo.reset()
            if on_gpu:
                torch.cuda.empty_cache()

    print("\nfwd+bwd (dx and all adapters), bf16 activations; TFLOP/s of the base matmuls; extra peak MiB")
    print(f"{'op':<10} {'weight':<6} {'provider':<13} {'ms':>9} {'TFLOP/s':>8} {'MiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['op']:<10} {r['weight']:<6} {r['provider']:<13} error: {r['error'][:70]}")
            continue
        mib = "-" if r["extra_peak_mib"] is None else f"{r['extra_peak_mib']:.0f}"
        print(f"{r['op']:<10} {r['weight']:<6} {r['provider']:<13} {r['ms']:>9.3f} {r['tflops']:>8.1f} {mib:>8}")


if __name__ == "__main__":
    main()
