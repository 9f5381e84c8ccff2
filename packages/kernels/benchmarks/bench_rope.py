"""Benchmark RoPE on q and k, forward + backward, bf16, on a CUDA GPU.

Providers: PyTorch eager written as transformers' ``apply_rotary_pos_emb`` (Llama), torch.compile of that same
function, Liger-Kernel's ``liger_rotary_pos_emb`` (when installed), swiftune's ``apply_rotary_pos_emb`` (per-token
cos/sin, as a patched LlamaAttention calls it) and swiftune's ``rope`` reading a (max_pos, head_dim) table at
packed position ids (``ours_table``). Layouts: ``hf`` is q_proj(x).view(b, s, h, d).transpose(1, 2), what attention
modules hand to RoPE; ``contiguous`` is a contiguous (b, h, s, d) tensor. Prints one ``RESULT {json}`` line per
measurement and a table.

    uv run python packages/kernels/benchmarks/bench_rope.py                  # GPU, Llama-3.1-8B at 8k tokens
    uv run python packages/kernels/benchmarks/bench_rope.py --shapes 1x32x8x8192x128,4x32x8x2048x128
    uv run python packages/kernels/benchmarks/bench_rope.py --smoke          # tiny, CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from _timing import copy_bandwidth_gbps, time_ms


def rotate_half(x):
    # transformers' rotate_half
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb_eager(q, k, cos, sin, unsqueeze_dim=1):
    # transformers' apply_rotary_pos_emb (Llama)
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def _providers():
    """{provider: fn(q, k, tables) -> (q_out, k_out)}; Liger only when importable."""
    from swiftune_kernels.rope import apply_rotary_pos_emb, rope

    providers = {
        "eager": lambda q, k, t: apply_rotary_pos_emb_eager(q, k, t["cos"], t["sin"]),
        "compile": None,
        "liger": None,
        "ours": lambda q, k, t: apply_rotary_pos_emb(q, k, t["cos"], t["sin"]),
        "ours_table": lambda q, k, t: rope(q, k, t["cos_table"], t["sin_table"], t["position_ids"]),
    }
    compiled = torch.compile(apply_rotary_pos_emb_eager)
    providers["compile"] = lambda q, k, t: compiled(q, k, t["cos"], t["sin"])
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        # Liger rotates q and k in place (and the gradients in place in backward); the timing loop only
        # re-rotates the same tensors, which keeps their norms, so the numbers stay meaningful.
        providers["liger"] = lambda q, k, t: liger_rotary_pos_emb(q, k, t["cos"], t["sin"])
    except ImportError:
        pass
    return providers


def _tables(batch, seq, head_dim, device, dtype):
    """Llama-3 style tables (theta 5e5): a (max_pos, head_dim) table, packed position ids and the per-token rows."""
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos_table, sin_table = emb.cos().to(dtype), emb.sin().to(dtype)
    # packed: samples of 1/4 and 3/4 of the sequence, positions restarting at the boundary
    cut = seq // 4
    position_ids = torch.cat((torch.arange(cut), torch.arange(seq - cut))).to(device)[None].expand(batch, seq)
    plain = torch.arange(seq, device=device)[None]
    return {
        "cos": cos_table[plain],  # (1, seq, head_dim), what LlamaRotaryEmbedding returns for one sequence
        "sin": sin_table[plain],
        "cos_table": cos_table,
        "sin_table": sin_table,
        "position_ids": position_ids.contiguous(),
    }


def _qk(batch, q_heads, k_heads, seq, head_dim, layout, device, dtype, gen):
    def make(heads):
        if layout == "hf":  # (b, s, h, d) storage seen as (b, h, s, d)
            x = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=gen)
        return x.requires_grad_()

    return make(q_heads), make(k_heads)


def _relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def measure(provider, fn, shape, layout, device, on_gpu, smoke, copy_gbps):
    batch, q_heads, k_heads, seq, head_dim = shape
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = _qk(batch, q_heads, k_heads, seq, head_dim, layout, device, dtype, gen)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    tables = _tables(batch, seq, head_dim, device, dtype)

    # correctness on copies (Liger writes into its inputs), against float64 transformers math
    qc, kc = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    tables_used = tables
    if provider == "ours_table":  # the packed positions: compare with the rows they select
        tables_used = {
            "cos": tables["cos_table"][tables["position_ids"]],
            "sin": tables["sin_table"][tables["position_ids"]],
        }
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = apply_rotary_pos_emb_eager(q64, k64, tables_used["cos"].double(), tables_used["sin"].double())
    ref_grads = torch.autograd.grad(ref, (q64, k64), (dq.double(), dk.double()))
    out = fn(qc, kc, tables)
    err = max(_relerr(out[0], ref[0]), _relerr(out[1], ref[1]))
    grads = torch.autograd.grad(out, (qc, kc), (dq.clone(), dk.clone()))
    err_grad = max(_relerr(grads[0], ref_grads[0]), _relerr(grads[1], ref_grads[1]))
    del qc, kc, out, grads, ref, ref_grads, q64, k64

    def step():
        torch.autograd.grad(fn(q, k, tables), (q, k), (dq, dk))

    ms, timing = time_ms(step, on_gpu, smoke)
    extra_mb = None
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    # Bytes that must move at minimum: forward reads q, k and writes q', k'; backward reads dq', dk' and writes
    # dq, dk (4 x (q + k)); each pass also reads cos and sin once (seq x head_dim each).
    qk = (q.numel() + k.numel()) * q.element_size()
    bytes_min = 4 * qk + 2 * 2 * seq * head_dim * q.element_size()
    gbps = bytes_min / ms / 1e6
    return {
        "op": "rope",
        "provider": provider,
        "shape": "x".join(map(str, shape)),
        "layout": layout,
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
    parser.add_argument("--shapes", default="1x32x8x8192x128", help="comma-separated BxQHxKHxSxD list")
    parser.add_argument("--layouts", default="hf,contiguous")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        if not args.smoke:
            sys.exit("bench_rope.py needs a CUDA GPU; use --smoke for a CPU check under Triton's interpreter.")
        # Triton picks interpret-or-compile when a kernel is decorated: set this before importing the kernels.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes = (
        [(1, 4, 2, 64, 32)] if args.smoke else [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    )

    copy_gbps = copy_bandwidth_gbps(device, on_gpu, args.smoke)
    print("RESULT " + json.dumps({"copy_bandwidth_gbps": round(copy_gbps, 1)}), flush=True)
    results = []
    providers = _providers()
    for shape in shapes:
        for layout in args.layouts.split(","):
            for provider, fn in providers.items():
                if fn is None or (provider == "compile" and args.smoke):
                    continue  # Inductor's CPU build takes minutes; the GPU run covers it
                try:
                    row = measure(provider, fn, shape, layout, device, on_gpu, args.smoke, copy_gbps)
                except Exception as error:  # one failing provider must not lose the others' numbers
                    row = {"op": "rope", "provider": provider, "shape": "x".join(map(str, shape)), "layout": layout}
                    row["error"] = repr(error)[:300]
                print("RESULT " + json.dumps(row), flush=True)
                results.append(row)
            torch._dynamo.reset()

    print(f"\ncopy bandwidth: {copy_gbps:.0f} GB/s (rope q+k, bf16, fwd+bwd, % of copy bandwidth; extra peak MiB)")
    print(f"{'shape':<18} {'layout':<11} {'provider':<11} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'MiB':>8} {'relerr':>9}")
    for r in results:
        head = f"{r['shape']:<18} {r['layout']:<11} {r['provider']:<11}"
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
