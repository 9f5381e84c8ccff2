"""The cross-entropy and RoPE parts of sweep_kernels.py: candidates of ours against the default, Liger and
torch.compile, every provider timed the same way (CUDA-graph GPU time; do_bench alongside in ``ms_do_bench``).

- cross_entropy, fwd+bwd, bf16, in place, 8192 x 128256 and 8192 x 256000: the row kernel's default against the
  variants of ``CONFIG`` in cross_entropy.py: ``lane_cols`` (the width of a lane of the loss pass's reductions),
  ``grad_prefetch`` (the gradient pass double-buffered) and ``programs_per_sm`` (persistent grids), with block /
  warp changes; the fused linear CE (frozen lm_head) with the default and the best variant, as it calls the same
  kernel.
  Competitors: transformers' float32 upcast + F.cross_entropy under torch.compile, and Liger (which reads the loss
  back to the host, ``.item()``: it cannot be captured, its row is do_bench, marked in the table).
- rope, fwd+bwd of q and k, Llama-3.1-8B at 8k tokens, q (1, 32, 8192, 128), k (1, 8, 8192, 128): "heads" and
  "tokens" kernels at several launch shapes, in transformers' (b, s, h, d) storage and contiguous, against eager
  (transformers' code), torch.compile of it and Liger (which rotates q and k in place).
"""

from __future__ import annotations

import importlib

import torch

# (name, CONFIG change): the row kernel's variants. The default reduces a block at once (one lane a block); lanes of
# 256 columns (one warp's loads of bf16) keep a max and sum per warp until the row ends.
CE_CANDIDATES = [
    ("lanes of 256 columns", dict(lane_cols=256)),
    ("no gradient prefetch", dict(grad_prefetch=False)),
    ("32 KiB blocks", dict(block_v=16384)),
]
CE_SMOKE = [
    ("lanes of 16", dict(block_v=64, lane_cols=16)),
    ("persistent 1/SM", dict(programs_per_sm=1)),
]

# (name, CONFIG change) for transformers' layout; "tokens" = one program a few tokens with all their q and k heads
ROPE_HF = [
    ("tokens (default)", {}),
    ("heads 2/program", dict(hf_kernel="heads")),
    ("tokens s=1 w=4", dict(token_warps=4)),
    ("tokens s=1 no eviction hint", dict(token_eviction="")),
    ("tokens s=1 w=1", dict(token_warps=1)),
    ("tokens s=2 w=4", dict(tokens_per_program=2, token_warps=4, token_tile=8192)),
    ("tokens s=4 w=8", dict(tokens_per_program=4, token_warps=8, token_tile=16384)),
    ("tokens s=1 tile=2048", dict(token_tile=2048)),
]
ROPE_CONTIGUOUS = [
    ("heads 2/program (default)", {}),
    ("tokens s=1", dict(contiguous_kernel="tokens")),
    ("tokens s=4 w=4", dict(contiguous_kernel="tokens", tokens_per_program=4, token_warps=4, token_tile=16384)),
]


def _best(rows, **match):
    ok = [r for r in rows if "ms" in r and all(r.get(k) == v for k, v in match.items()) and r.get("valid", True)]
    return min(ok, key=lambda r: r["ms"]) if ok else None


# --- cross-entropy -----------------------------------------------------------------------------------------------


def _cross_entropy_shape(sweep, ce, default, rows, vocab, candidates):
    from bench_cross_entropy import hf_cross_entropy

    from swiftune_kernels import cross_entropy

    gen = torch.Generator(device=sweep.device).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=sweep.device, generator=gen) * 2).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=sweep.device, generator=gen)
    targets[::20] = -100
    ce.CONFIG.update(default)
    ref = logits.clone().requires_grad_()
    ref_loss = cross_entropy(ref, targets)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref)
    del ref
    base = logits.clone().requires_grad_()

    def step_of(fn):
        # a view makes the logits a non-leaf, as lm_head's output is (in-place providers refuse or corrupt leaves)
        return lambda: torch.autograd.grad(fn(base.view_as(base), targets), [base])

    def check():
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, targets)
        (grad,) = torch.autograd.grad(loss, x)
        # relative to the largest gradient (a mean over ~8k rows makes every entry small); bf16 rounding is ~4e-3
        err = ((grad.float() - ref_grad.float()).abs().max() / ref_grad.float().abs().max()).item()
        loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
        return {"loss_rel_err": loss_err, "grad_rel_err": err, "valid": err < 2e-2 and loss_err < 1e-4}

    shape = f"{rows}x{vocab}"
    min_bytes = 2 * rows * vocab * 2  # read the logits once, write their gradient once (what a copy moves)
    ours = step_of(lambda x, t: cross_entropy(x, t, inplace=True))
    for name, config in [("row (default)", {}), *candidates]:
        ce.CONFIG.update(default, **config)
        sweep.run("cross_entropy", shape, name, config, ours, min_bytes, check, do_bench=True)
    ce.CONFIG.update(default)
    if sweep.smoke:
        return  # Inductor's CPU build takes minutes; Liger needs a GPU
    compiled = torch.compile(hf_cross_entropy)
    sweep.run("cross_entropy", shape, "torch.compile", None, step_of(compiled), min_bytes, competitor=True)
    torch._dynamo.reset()
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except ImportError:
        return
    liger = LigerCrossEntropyLoss(ignore_index=-100, reduction="mean")
    sweep.run("cross_entropy", shape, "liger", None, step_of(liger), min_bytes, competitor=True)


def _fused_linear_cross_entropy(sweep, ce, default, n, hidden, vocab, configs):
    from swiftune_kernels import fused_linear_cross_entropy

    gen = torch.Generator(device=sweep.device).manual_seed(1)
    h = torch.randn(n, hidden, device=sweep.device, generator=gen).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, device=sweep.device, generator=gen) / hidden**0.5).to(torch.bfloat16)
    t = torch.randint(0, vocab, (n,), device=sweep.device, generator=gen)
    for name, config in configs:
        ce.CONFIG.update(default, **config)
        step = lambda: torch.autograd.grad(fused_linear_cross_entropy(h, w, t), [h])  # noqa: E731
        sweep.run("fused_linear_cross_entropy", f"{n}x{hidden}x{vocab}", name, config, step, case="frozen lm_head")
    ce.CONFIG.update(default)


def sweep_cross_entropy(sweep):
    ce = importlib.import_module("swiftune_kernels.cross_entropy")
    default = dict(ce.CONFIG)
    shapes = [(8, 300)] if sweep.smoke else [(8192, 128256), (8192, 256000)]
    for rows, vocab in shapes:
        _cross_entropy_shape(sweep, ce, default, rows, vocab, CE_SMOKE if sweep.smoke else CE_CANDIDATES)
        if sweep.on_gpu:
            torch.cuda.empty_cache()
    # The fused linear CE calls the same kernel per chunk of tokens: the default and the best variant at 256k.
    variants = [r for r in sweep.rows if r.get("op") == "cross_entropy" and r.get("config")]
    best = _best(variants, shape="x".join(map(str, shapes[-1])))
    configs = [("row (default)", {})] + ([(best["candidate"], best["config"])] if best else [])
    n, hidden, vocab = (16, 32, 300) if sweep.smoke else (8192, 4096, 128256)
    _fused_linear_cross_entropy(sweep, ce, default, n, hidden, vocab, configs)


# --- RoPE --------------------------------------------------------------------------------------------------------


def _rope_layout(sweep, rope_module, default, dims, layout, configs):
    from bench_rope import _qk, _tables, apply_rotary_pos_emb_eager

    from swiftune_kernels.rope import apply_rotary_pos_emb

    batch, q_heads, k_heads, seq, head_dim = dims
    shape = "x".join(map(str, dims))
    tables = _tables(batch, seq, head_dim, sweep.device, torch.bfloat16)
    cos, sin = tables["cos"], tables["sin"]
    # forward reads q, k and writes q', k'; backward reads dq', dk' and writes dq, dk; each pass reads cos and sin
    min_bytes = 4 * (q_heads + k_heads) * batch * seq * head_dim * 2 + 2 * 2 * seq * head_dim * 2
    gen = torch.Generator(device=sweep.device).manual_seed(0)
    q, k = _qk(batch, q_heads, k_heads, seq, head_dim, layout, sweep.device, torch.bfloat16, gen)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    rope_module.CONFIG.update(default)
    ref = apply_rotary_pos_emb(q, k, cos, sin)
    # detached: an output that keeps its autograd graph alive keeps q's and k's AccumulateGrad nodes on the default
    # stream, and every later CUDA-graph capture (on a side stream) of a step over q and k then fails
    ref_all = tuple(t.detach() for t in (*ref, *torch.autograd.grad(ref, (q, k), (dq, dk))))
    del ref

    def check():
        out = apply_rotary_pos_emb(q, k, cos, sin)
        got = (*out, *torch.autograd.grad(out, (q, k), (dq, dk)))
        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref_all, strict=True))
        return {"max_err_vs_default": err, "valid": err < 1e-2}

    def step_of(fn, q=q, k=k):
        return lambda: torch.autograd.grad(fn(q, k, cos, sin), (q, k), (dq, dk))

    for name, config in configs:
        rope_module.CONFIG.update(default, **config)
        step = step_of(apply_rotary_pos_emb)
        sweep.run("rope", shape, name, config, step, min_bytes, check, do_bench=True, layout=layout)
    rope_module.CONFIG.update(default)
    if sweep.smoke:
        return
    for name, fn in [
        ("eager", apply_rotary_pos_emb_eager),
        ("torch.compile", torch.compile(apply_rotary_pos_emb_eager)),
    ]:
        sweep.run("rope", shape, name, None, step_of(fn), min_bytes, do_bench=True, layout=layout, competitor=True)
    torch._dynamo.reset()
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return
    # Liger rotates q and k in place (and the gradients in backward), as it would rotate a projection's output;
    # on its own copies, re-rotated each step (rotations keep the norms, so the values stay meaningful).
    ql, kl = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    step = lambda: torch.autograd.grad(liger_rotary_pos_emb(ql, kl, cos, sin), (ql, kl), (dq, dk))  # noqa: E731
    sweep.run("rope", shape, "liger", None, step, min_bytes, do_bench=True, layout=layout, competitor=True)


def sweep_rope(sweep):
    rope_module = importlib.import_module("swiftune_kernels.rope")
    default = dict(rope_module.CONFIG)
    dims = (1, 4, 2, 64, 32) if sweep.smoke else (1, 32, 8, 8192, 128)
    _rope_layout(sweep, rope_module, default, dims, "hf", ROPE_HF[:3] if sweep.smoke else ROPE_HF)
    _rope_layout(
        sweep, rope_module, default, dims, "contiguous", ROPE_CONTIGUOUS[:2] if sweep.smoke else ROPE_CONTIGUOUS
    )


# --- the comparison table, printed last ----------------------------------------------------------------------------


def print_table(rows, copy_gbps):
    """One line a provider and shape: GPU ms (``*``: do_bench, no capture), do_bench ms, % copy, vs the default."""
    print(f"\nCross-entropy and RoPE, fwd+bwd bf16 (copy bandwidth {copy_gbps} GB/s). ms: CUDA-graph GPU time,")
    print("* = do_bench (the provider syncs with the host and cannot be captured); vs def = default ms / ms.")
    print(
        f"{'op':<27} {'shape':<17} {'case':<10} {'provider':<30} {'ms':>9} {'do_bench':>9} {'%copy':>6} {'vs def':>7}"
    )
    timed = [r for r in rows if r.get("op") in ("cross_entropy", "rope", "fused_linear_cross_entropy") and "shape" in r]
    for r in timed:
        case = r.get("layout") or r.get("case") or ""
        default = next(
            (d for d in timed if d.get("is_default") and "ms" in d and (d["op"], d["shape"]) == (r["op"], r["shape"])
             and (d.get("layout") or d.get("case") or "") == case), None,
        )  # fmt: skip
        head = f"{r['op']:<27} {r['shape']:<17} {case[:10]:<10} {r['candidate'][:30]:<30}"
        if "ms" not in r:
            reason = r.get("error") or r.get("skipped") or ("invalid" if not r.get("valid", True) else "?")
            print(f"{head} {str(reason)[:40]}")
            continue
        mark = "" if r.get("timing") == "cudagraph" else "*"
        bench = f"{r['ms_do_bench']:.4f}" if "ms_do_bench" in r else "-"
        pct = f"{r['pct_copy_bw']:.1f}" if "pct_copy_bw" in r else "-"
        ratio = f"{default['ms'] / r['ms']:.2f}x" if default else "-"
        print(f"{head} {r['ms']:>8.4f}{mark:1} {bench:>9} {pct:>6} {ratio:>7}")
