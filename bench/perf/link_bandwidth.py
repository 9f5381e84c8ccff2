"""Host link bandwidth as the offload copies see it: pinned device-to-host and host-to-device copies of one
Llama-8B MLP intermediate (2 x 2048 tokens x 14336, bf16: 112 MiB) on a side stream, alone and while the main
stream runs bf16 matmuls. Prints one RESULT line.

    python bench/perf/link_bandwidth.py
"""

from __future__ import annotations

import json

import torch

NBYTES = 2 * 2048 * 14336 * 2


def _timed_copies(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream, repeats: int) -> float:
    """GB/s of ``repeats`` copies of src into dst on ``stream``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        end.record()
    end.synchronize()
    return repeats * src.numel() / (start.elapsed_time(end) * 1e-3) / 1e9


def link_gbs(nbytes: int = NBYTES, repeats: int = 5) -> dict[str, float]:
    """Pinned device-to-host and host-to-device GB/s in this process (its pinned pages are where it got them)."""
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    out = {}
    for name, dst, src in (("d2h", host, device), ("h2d", device, host)):
        _timed_copies(dst, src, side, 1)
        out[f"link_{name}_gbs"] = round(_timed_copies(dst, src, side, repeats), 1)
    return out


def main() -> None:
    device = torch.empty(NBYTES, dtype=torch.uint8, device="cuda")
    host = torch.empty(NBYTES, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    result = {}
    for name, dst, src in (("d2h", host, device), ("h2d", device, host)):
        _timed_copies(dst, src, side, 2)  # warm-up
        result[f"{name}_gbs"] = round(_timed_copies(dst, src, side, 10), 1)
        for _ in range(40):  # keep the main stream busy for longer than the copies
            torch.mm(a, b)
        result[f"{name}_under_matmul_gbs"] = round(_timed_copies(dst, src, side, 10), 1)
        torch.cuda.synchronize()
    print("RESULT " + json.dumps({"link": result}), flush=True)


if __name__ == "__main__":
    main()
