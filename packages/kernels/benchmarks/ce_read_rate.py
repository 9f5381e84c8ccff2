"""How fast a program can read, apart from cross-entropy's arithmetic: a row-max kernel over (8192, 256000) bf16 with
plain loads (64 KiB blocks, double-buffered in registers) and with TMA descriptor loads pipelined through shared
memory, on grids of one program an SM, 3/4 and 1/2 of that. Prints GB/s read in all and per program.

    python packages/kernels/benchmarks/ce_read_rate.py
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from _timing import time_ms


@triton.jit
def plain_row_max(x_ptr, out_ptr, n_rows, n_cols, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        x_row = x_ptr + row.to(tl.int64) * n_cols
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        x_next = tl.load(x_row + offs, mask=offs < n_cols, other=float("-inf"))
        for start in range(0, n_cols, BLOCK):
            x = x_next.to(tl.float32)
            cols = start + BLOCK + offs
            x_next = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf"))
            m = tl.maximum(m, x)
        tl.store(out_ptr + row, tl.max(m, 0))


@triton.jit
def tma_row_max(desc, out_ptr, n_rows, n_cols, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        m = tl.full([1, BLOCK], float("-inf"), tl.float32)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            m = tl.maximum(m, desc.load([row, start]).to(tl.float32))
        tl.store(out_ptr + row, tl.max(tl.max(m, 1), 0))


def main():
    if not torch.cuda.is_available():
        sys.exit("ce_read_rate.py needs a CUDA GPU.")
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows, cols = 8192, 256000
    x = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
    out = torch.empty(rows, device="cuda")
    expected = x.float().amax(1)
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    gbytes = rows * cols * 2 / 1e9
    table = []
    for programs in (n_sm, n_sm * 3 // 4, n_sm // 2):
        cases = [
            (
                "plain, 64 KiB blocks, 32 warps",
                lambda p=programs: plain_row_max[(p,)](x, out, rows, cols, BLOCK=32768, num_warps=32),
            )
        ]
        for block, stages, warps in ((16384, 4, 16), (16384, 6, 16), (32768, 3, 32)):
            desc = TensorDescriptor.from_tensor(x, block_shape=[1, block])
            cases.append((f"TMA, {block * 2 // 1024} KiB blocks, {stages} stages, {warps} warps",
                          lambda p=programs, d=desc, b=block, s=stages, w=warps: tma_row_max[(p,)](
                              d, out, rows, cols, BLOCK=b, STAGES=s, num_warps=w)))  # fmt: skip
        for name, launch in cases:
            ms, _ = time_ms(launch, True, False)
            if not torch.equal(out, expected):
                sys.exit(f"{name}: wrong row maxima")
            table.append((programs, name, ms, gbytes / ms * 1e3))
            print(f"RESULT programs={programs} {name}: {ms:.4f} ms", flush=True)
    print(f"\n{'programs':>8} {'kernel':<38} {'ms':>8} {'GB/s':>7} {'GB/s a program':>15}")
    for programs, name, ms, gbps in table:
        print(f"{programs:>8} {name:<38} {ms:>8.4f} {gbps:>7.0f} {gbps / programs:>15.1f}")


if __name__ == "__main__":
    main()
