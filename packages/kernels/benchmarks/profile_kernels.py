"""Launch-configuration sweeps of single kernels of ours (CUDA-graph GPU time), to pick the launchers' defaults.

python packages/kernels/benchmarks/profile_kernels.py     # CUDA GPU only
"""

# ruff: noqa: B023  (each closure is timed inside the iteration that made it)
from __future__ import annotations

import importlib
import json

import torch
from _timing import time_ms


def emit(name: str, ms: float, nbytes: int, info: dict) -> None:
    row = {"profile": name, "ms": round(ms, 4), "gbps": round(nbytes / ms / 1e6, 1), **info}
    print("RESULT " + json.dumps(row), flush=True)


def copies(dev) -> None:
    for numel in (1 << 26, 1 << 28):
        src = torch.randn(numel, device=dev, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        for attempt in range(2):
            ms, info = time_ms(lambda: dst.copy_(src), True, False)
            emit(f"copy_{numel * 2 >> 20}MiB_try{attempt}", ms, 2 * numel * 2, info)


def cross_entropy(dev) -> None:
    from swiftune_kernels.cross_entropy import cross_entropy_forward

    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    one = torch.ones(1, device=dev)
    for vocab in (128256, 256000):
        logits = torch.randn(8192, vocab, device=dev, dtype=torch.bfloat16)
        targets = torch.randint(0, vocab, (8192,), device=dev)
        targets[::20] = -100
        configs = [(None, None, None)] + [(None, None, p) for p in (sms, sms * 7 // 8, sms * 3 // 4, sms // 2)]
        configs += [(16384, 16, 2 * sms), (16384, 16, sms)]
        for bv, nw, programs in configs:
            ms, info = time_ms(
                lambda bv=bv, nw=nw, p=programs: cross_entropy_forward(
                    logits, targets, one, grad=logits, block_v=bv, num_warps=nw, programs=p
                ),
                True,
                False,
            )
            emit(f"ce_{vocab}_bv{bv}_w{nw}_p{programs}", ms, 2 * logits.numel() * 2, info)


def rope(dev) -> None:
    rope_module = importlib.import_module("swiftune_kernels.rope")  # the module, not the rope() it exports

    batch, qh, kh, seq, dim = 1, 32, 8, 8192, 128
    pos = torch.arange(seq, device=dev)[None]
    inv = 1.0 / (500000 ** (torch.arange(0, dim, 2, device=dev).float() / dim))
    emb = torch.cat(((pos[0].float()[:, None] * inv[None]),) * 2, dim=-1)
    cos, sin = emb.cos().to(torch.bfloat16)[None], emb.sin().to(torch.bfloat16)[None]
    default = (rope_module._TILE_ELEMENTS, rope_module._MAX_HEADS_PER_PROGRAM, rope_module._NUM_WARPS)
    configs = [default, (1024, 4, 4), (1024, 2, 4), (2048, 8, 4), (2048, 4, 4), (512, 8, 4), (4096, 8, 8), (2048, 8, 8)]
    for layout in ("hf", "contiguous"):
        if layout == "hf":
            q = torch.randn(batch, seq, qh, dim, device=dev, dtype=torch.bfloat16).transpose(1, 2)
            k = torch.randn(batch, seq, kh, dim, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        else:
            q = torch.randn(batch, qh, seq, dim, device=dev, dtype=torch.bfloat16)
            k = torch.randn(batch, kh, seq, dim, device=dev, dtype=torch.bfloat16)
        q.requires_grad_()
        k.requires_grad_()
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        nbytes = 4 * (q.numel() + k.numel()) * 2
        for tile, heads, warps in configs:
            rope_module._TILE_ELEMENTS, rope_module._MAX_HEADS_PER_PROGRAM, rope_module._NUM_WARPS = tile, heads, warps

            def step():
                torch.autograd.grad(rope_module.apply_rotary_pos_emb(q, k, cos, sin), (q, k), (dq, dk))

            ms, info = time_ms(step, True, False)
            emit(f"rope_{layout}_tile{tile}_heads{heads}_w{warps}", ms, nbytes, info)
    rope_module._TILE_ELEMENTS, rope_module._MAX_HEADS_PER_PROGRAM, rope_module._NUM_WARPS = default


def main() -> None:
    dev = torch.device("cuda")
    copies(dev)
    cross_entropy(dev)
    rope(dev)


if __name__ == "__main__":
    main()
