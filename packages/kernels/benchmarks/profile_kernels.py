"""GPU time of single kernels of ours (CUDA-graph replay), to tell forward from backward costs.

python packages/kernels/benchmarks/profile_kernels.py     # CUDA GPU only
"""

from __future__ import annotations

import json

import torch
from _timing import time_ms


def main() -> None:
    from swiftune_kernels.cross_entropy import cross_entropy_forward
    from swiftune_kernels.layer_norm import layer_norm_backward, layer_norm_forward
    from swiftune_kernels.rms_norm import rms_norm_backward, rms_norm_forward

    dev = torch.device("cuda")
    rows, hidden = 16384, 4096
    x = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = torch.ones(hidden, device=dev, dtype=torch.bfloat16)
    b = torch.zeros_like(w)
    nbytes = x.numel() * 2
    y, mean, rstd = layer_norm_forward(x, w, b, 1e-5)
    _, rrstd = rms_norm_forward(x, w, 1e-6, 0.0, "llama")
    cases = {
        "ln_fwd": (lambda: layer_norm_forward(x, w, b, 1e-5), 2),
        "ln_bwd_frozen": (lambda: layer_norm_backward(dy, x, w, b, mean, rstd, False, False), 3),
        "ln_bwd_trainable": (lambda: layer_norm_backward(dy, x, w, b, mean, rstd, True, True), 3),
        "aten_ln_fwd": (lambda: torch.native_layer_norm(x, (hidden,), w, b, 1e-5), 2),
        "rms_fwd": (lambda: rms_norm_forward(x, w, 1e-6, 0.0, "llama"), 2),
        "rms_bwd_frozen": (lambda: rms_norm_backward(dy, x, w, rrstd, 0.0, "llama", False), 3),
        "rms_bwd_trainable": (lambda: rms_norm_backward(dy, x, w, rrstd, 0.0, "llama", True), 3),
        "copy": (lambda: y.copy_(x), 2),
    }
    logits = torch.randn(8192, 128256, device=dev, dtype=torch.bfloat16)
    targets = torch.randint(0, 128256, (8192,), device=dev)
    one = torch.ones(1, device=dev)
    for bv, nw, hints in ((None, None, True), (None, None, False), (16384, 32, True), (8192, 16, True)):
        cases[f"ce_fwd_bv{bv}_w{nw}_hints{hints}"] = (
            lambda bv=bv, nw=nw, hints=hints: cross_entropy_forward(
                logits, targets, one, grad=logits, block_v=bv, num_warps=nw, l2_hints=hints
            ),
            logits.numel() * 2 / nbytes * 2,
        )
    for name, (fn, units) in cases.items():
        ms, info = time_ms(fn, True, False)
        gbps = units * nbytes / ms / 1e6
        print("RESULT " + json.dumps({"profile": name, "ms": round(ms, 4), "gbps": round(gbps, 1), **info}), flush=True)


if __name__ == "__main__":
    main()
