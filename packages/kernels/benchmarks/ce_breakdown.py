"""Where the time of one cross-entropy step goes: the whole fwd+bwd against each of its launches alone.

CUDA-graph GPU time of: the step (forward + ``torch.autograd.grad``, in place), its kernel alone (and with lanes of
256 columns), and the small launches around it (the mean's weight, the mean, the
backward's scaling that exits where grad_output is 1). Prints one ``RESULT {json}`` line per part and a table.

    python packages/kernels/benchmarks/ce_breakdown.py --shapes 8192x128256,8192x256000
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch
from _timing import copy_bandwidth_gbps, time_ms
from bench_cross_entropy import make_inputs, pct_of_copy

from swiftune_kernels import cross_entropy
from swiftune_kernels.cross_entropy_reduce import cross_entropy_backward, mean_loss, mean_weight

# the module (the package exports the function under the same name)
ce = importlib.import_module("swiftune_kernels.cross_entropy")


def _parts(rows, vocab, device):
    logits, targets = make_inputs(rows, vocab, torch.bfloat16, device)
    base = logits.clone().requires_grad_()
    weight, denominator = mean_weight(targets, -100)
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    one = torch.ones((), device=device)

    def step():
        return torch.autograd.grad(cross_entropy(base.view_as(base), targets, inplace=True), [base])

    def kernel(**options):
        return lambda: ce.cross_entropy_forward(logits, targets, weight, grad=logits, loss=loss, **options)

    # (part, fn, whether it moves the logits: only those get a % of copy bandwidth)
    return [
        ("step (forward + backward)", step, True),
        ("kernel alone", kernel(), True),
        ("kernel alone, lanes of 256 columns", kernel(lane_cols=256), True),
        ("mean weight", lambda: mean_weight(targets, -100), False),
        ("mean of the losses", lambda: mean_loss(loss, denominator), False),
        ("backward scaling (grad_output 1)", lambda: cross_entropy_backward(logits, one.reshape(-1)), False),
        ("ones_like(loss)", lambda: torch.ones_like(one), False),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="8192x128256,8192x256000")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ce_breakdown.py needs a CUDA GPU (bench_cross_entropy.py --smoke checks the code on the CPU).")
    device = torch.device("cuda")
    copy_gbps = copy_bandwidth_gbps(device, True, False)
    table = []
    for shape in args.shapes.split(","):
        rows, vocab = map(int, shape.split("x"))
        parts = _parts(rows, vocab, device)
        for name, fn, moves_logits in parts:
            ms, info = time_ms(fn, True, False)
            pct = round(pct_of_copy(rows, vocab, ms, copy_gbps), 1) if moves_logits else None
            row = {"op": "cross_entropy_breakdown", "shape": shape, "part": name, "ms": round(ms, 4),
                   "pct_copy_bw": pct, "copy_gbps": round(copy_gbps, 1), **info}  # fmt: skip
            print("RESULT " + json.dumps(row), flush=True)
            table.append(row)
        del parts
        torch.cuda.empty_cache()
    print(f"\ncopy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'shape':<14} {'part':<36} {'ms':>9} {'% copy':>7}")
    for row in table:
        pct = "-" if row["pct_copy_bw"] is None else f"{row['pct_copy_bw']:.1f}"
        print(f"{row['shape']:<14} {row['part']:<36} {row['ms']:>9.4f} {pct:>7}")


if __name__ == "__main__":
    main()
