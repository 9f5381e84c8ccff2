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


def link_gbs(nbytes: int = NBYTES, repeats: int = 5, keep_busy=None) -> dict[str, float]:
    """Pinned device-to-host and host-to-device GB/s in this process (its pinned pages are where it got them);
    ``keep_busy`` (a function) queues work on the main stream before each timing."""
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    out = {}
    for name, dst, src in (("d2h", host, device), ("h2d", device, host)):
        _timed_copies(dst, src, side, 1)  # warm-up
        if keep_busy is not None:
            keep_busy()
        out[f"link_{name}_gbs"] = round(_timed_copies(dst, src, side, repeats), 1)
        torch.cuda.synchronize()
    return out


def main() -> None:
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)

    def matmuls() -> None:  # keep the main stream busy for longer than the copies
        for _ in range(40):
            torch.mm(a, b)

    result = {f"{key[5:-4]}_gbs": value for key, value in link_gbs(repeats=10).items()}
    busy = link_gbs(repeats=10, keep_busy=matmuls)
    result.update({f"{key[5:-4]}_under_matmul_gbs": value for key, value in busy.items()})
    print("RESULT " + json.dumps({"link": result}), flush=True)


if __name__ == "__main__":
    main()
