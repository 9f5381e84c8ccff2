"""Probe (not a benchmark of record): where the cross-entropy row kernel's time goes at large vocabularies.

A stripped copy of the row kernel (no scaling / soft-capping, in place) with modes:
  normal     - loss pass, then the gradient pass re-reading the row in reverse (as the library's kernel)
  no-reread  - the gradient pass stores without re-reading the logits (one read, one write: the ceiling if every
               re-read hit L2; its values are wrong)
  loss-only  - the loss pass alone (reads only)
  forward    - the gradient pass in the loss pass's order
  max-only   - the loss pass computing only the maximum (no exponentials)
A mode may end in "+cg": every load skips L1 (.cg), so that only L2 can serve the gradient pass's re-reads.
Every row records the global timer at its start, at the end of its loss pass and at its end, and its SM.

    python packages/kernels/benchmarks/ce_probe.py --shapes 8192x128256,8192x256000
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl
from _timing import copy_bandwidth_gbps, time_ms
from bench_cross_entropy import make_inputs

MODES = {"normal": 0, "no-reread": 1, "loss-only": 2, "forward": 3, "max-only": 4}


@triton.jit
def _probe_kernel(
    x_ptr,
    stride,
    t_ptr,
    loss_ptr,
    clock_ptr,
    n_cols,
    MODE: tl.constexpr,
    RECORD: tl.constexpr,
    BLOCK: tl.constexpr,
    CG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if RECORD:
        tl.store(clock_ptr + row * 4, tl.extra.cuda.globaltimer())
        tl.store(clock_ptr + row * 4 + 3, tl.extra.cuda.smid().to(tl.int64))
    x_row = x_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    target = tl.load(t_ptr + row)
    m = tl.full([1], float("-inf"), tl.float32)
    d = tl.zeros([1], tl.float32)
    # as the library: the loss pass keeps lines for the gradient pass's re-reads; modes without one do not
    keep: tl.constexpr = "evict_last" if MODE < 2 or MODE == 3 else "evict_first"
    if CG:
        x_next = tl.load(x_row + offs, mask=offs < n_cols, other=0.0, cache_modifier=".cg")
    else:
        x_next = tl.load(x_row + offs, mask=offs < n_cols, other=0.0, eviction_policy=keep)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.where(cols < n_cols, x_next.to(tl.float32), float("-inf"))
        if CG:
            x_next = tl.load(x_row + BLOCK + cols, mask=BLOCK + cols < n_cols, other=0.0, cache_modifier=".cg")
        else:
            x_next = tl.load(x_row + BLOCK + cols, mask=BLOCK + cols < n_cols, other=0.0, eviction_policy=keep)
        m_new = tl.maximum(m, tl.max(x, 0))
        if MODE != 4:
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    if MODE == 4:
        lse = tl.sum(m, 0)
    else:
        lse = tl.sum(m + tl.log(d), 0)
    if RECORD:
        tl.store(clock_ptr + row * 4 + 1, tl.extra.cuda.globaltimer())
    if MODE < 2 or MODE == 3:
        nb = tl.cdiv(n_cols, BLOCK)
        for i in range(0, nb):
            if MODE == 3:
                cols = i * BLOCK + offs
            else:
                cols = (nb - 1 - i) * BLOCK + offs
            mask = cols < n_cols
            if MODE == 1:
                g = tl.exp(cols.to(tl.float32) * 0.0 - lse)
            else:
                if CG:
                    x = tl.load(x_row + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
                else:
                    x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
                g = tl.exp(x - lse)
            g = tl.where(cols == target, g - 1.0, g)
            tl.store(x_row + cols, g, mask=mask, eviction_policy="evict_first")
    if RECORD:
        tl.store(clock_ptr + row * 4 + 2, tl.extra.cuda.globaltimer())
    tl.store(loss_ptr + row, lse)


def run(logits, targets, loss, clock, mode, record, block=32768, warps=32):
    rows, vocab = logits.shape
    base, _, flags = mode.partition("+")
    _probe_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        loss,
        clock,
        vocab,
        MODE=MODES[base],
        RECORD=record,
        BLOCK=block,
        CG="cg" in flags,
        num_warps=warps,
    )


def summarize(clock):
    c = clock.cpu().double()
    start, mid, end, sm = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    t0 = start.min()
    loss_us = ((mid - start) / 1e3).median().item()
    grad_us = ((end - mid) / 1e3).median().item()
    total_us = ((end.max() - t0) / 1e3).item()
    # how spread the first wave's starts are, and the starts of rows ~ 10 waves in (lockstep or not)
    order = torch.argsort(start)
    n_sm = int(sm.max().item()) + 1
    spreads = []
    for wave in (0, 10, 30):
        chunk = start[order[wave * n_sm : (wave + 1) * n_sm]]
        if len(chunk):
            spreads.append(round(((chunk.max() - chunk.min()) / 1e3).item(), 1))
    return dict(
        loss_pass_us=round(loss_us, 2),
        grad_pass_us=round(grad_us, 2),
        kernel_us=round(total_us, 1),
        wave_start_spread_us=spreads,
    )


def probe_shape(rows, vocab, modes, once, copy):
    """Time each mode at one shape (or run it once, for a profiler) and print its row."""
    device = torch.device("cuda")
    logits, targets = make_inputs(rows, vocab, torch.bfloat16, device)
    loss = torch.empty(rows, device=device)
    clock = torch.zeros(rows, 4, dtype=torch.int64, device=device)
    for mode in modes:
        if once:
            print(f"once {rows}x{vocab} {mode}", flush=True)
            run(logits, targets, loss, clock, mode, False)
            torch.cuda.synchronize()
            continue
        ms, _ = time_ms(lambda m=mode: run(logits, targets, loss, clock, m, False), True, False)
        moved = rows * vocab * 2 * (1 if mode in ("loss-only", "max-only") else 2)
        pct = 100 * moved / ms / 1e6 / copy
        run(logits, targets, loss, clock, mode, True)
        torch.cuda.synchronize()
        row = dict(shape=f"{rows}x{vocab}", mode=mode, ms=round(ms, 4), pct_copy=round(pct, 1), **summarize(clock))
        print("RESULT " + json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="8192x128256,8192x256000")
    parser.add_argument("--modes", default="normal,no-reread,loss-only,forward")
    parser.add_argument("--once", action="store_true", help="run each mode once (for ncu), no timing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ce_probe.py needs a CUDA GPU.")
    device = torch.device("cuda")
    copy = 1.0 if args.once else copy_bandwidth_gbps(device, True, False)
    print(f"copy bandwidth {copy:.0f} GB/s")
    for shape in args.shapes.split(","):
        rows, vocab = (int(n) for n in shape.split("x"))
        probe_shape(rows, vocab, args.modes.split(","), args.once, copy)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
