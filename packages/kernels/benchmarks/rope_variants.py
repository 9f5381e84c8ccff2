"""RoPE launch variants in transformers' layout, timed interleaved in one process (CUDA graphs), with repeats.

Where two launch shapes differ by ~1%, separate processes (rope_configs.sh) can disagree by as much; here every
variant and Liger run in turn, ``--repeats`` rounds, so that drifts of clocks or memory hit them alike. Variants are
CONFIG overrides of swiftune_kernels/rope.py for the drop-in ``apply_rotary_pos_emb`` (one half-width cos/sin row a
token, as a patched attention passes them) and for ``rope`` reading a full-width table at packed position ids.
Prints one ``RESULT {json}`` line per measurement and a table.

    python packages/kernels/benchmarks/rope_variants.py --repeats 3          # GPU, q 1x32x8192x128, k 8 heads
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch
from _timing import copy_bandwidth_gbps
from bench_rope import measure

SHAPE = (1, 32, 8, 8192, 128)
# (label, CONFIG override, path): "drop-in" = apply_rotary_pos_emb, "table" = rope(..., position_ids)
VARIANTS = [
    ("drop-in default", {}, "drop-in"),
    ("drop-in no eviction hint", {"token_eviction": ""}, "drop-in"),
    ("drop-in 4 warps", {"token_warps": 4}, "drop-in"),
    ("drop-in 2 warps", {"token_warps": 2}, "drop-in"),
    ("table default", {}, "table"),
    ("table no eviction hint", {"token_eviction": ""}, "table"),
    ("table 8 warps", {"token_warps_gather": 8}, "table"),
    ("table 2 warps", {"token_warps_gather": 2}, "table"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("rope_variants.py needs a CUDA GPU (bench_rope.py --smoke checks the code paths on the CPU).")
    from swiftune_kernels.rope import apply_rotary_pos_emb, rope

    rope_module = importlib.import_module("swiftune_kernels.rope")
    paths = {
        "drop-in": ("ours", lambda q, k, t: apply_rotary_pos_emb(q, k, t["cos"], t["sin"])),
        "table": ("ours_table", lambda q, k, t: rope(q, k, t["cos_table"], t["sin_table"], t["position_ids"])),
    }
    variants = list(VARIANTS)
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        paths["liger"] = ("liger", lambda q, k, t: liger_rotary_pos_emb(q, k, t["cos"], t["sin"]))
        variants.append(("liger", {}, "liger"))
    except ImportError:
        pass
    device = torch.device("cuda")
    copy_gbps = copy_bandwidth_gbps(device, True, False)
    print("RESULT " + json.dumps({"copy_bandwidth_gbps": round(copy_gbps, 1)}), flush=True)
    default = dict(rope_module.CONFIG)
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for repeat in range(args.repeats):
        for label, override, path in variants:
            rope_module.CONFIG.update(default, **override)
            provider, fn = paths[path]
            row = measure(provider, fn, SHAPE, "hf", device, True, False, copy_gbps)
            row.update(variant=label, config=override, repeat=repeat)
            print("RESULT " + json.dumps(row), flush=True)
            times[label].append(row["ms"])
    rope_module.CONFIG.update(default)
    print(f"\nRoPE {'x'.join(map(str, SHAPE))}, transformers' layout, bf16 fwd+bwd, CUDA-graph ms per repeat")
    for label, values in times.items():
        print(f"{label:<28} " + " ".join(f"{v:.4f}" for v in values))


if __name__ == "__main__":
    main()
